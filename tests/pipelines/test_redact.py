"""The redaction every log line, MLflow param and summary passes through."""

import pytest

from uniloom.pipelines.redact import MASK, is_secret_key, redact, redact_argv, redact_text


@pytest.mark.parametrize(
    "name",
    ["password", "api_key", "aws_access_key_id", "AWS_SECRET_ACCESS_KEY", "accessKeyId", "session_token",
     "MLFLOW_TRACKING_PASSWORD", "basic_auth", "Authorization", "X-Amz-Signature", "client_secret",
     "credentials", "private_key"],
)  # fmt: skip
def test_secret_names(name):
    assert is_secret_key(name)


@pytest.mark.parametrize(
    "name",
    ["key", "key_field", "num_tokens", "text_tokenizer", "tokenizer_weights", "RAY_AUTH_MODE",
     "MLFLOW_TRACKING_USERNAME", "authOptions", "tracking_uri", "fingerprint", "max_tokens",
     "token_path", "secretName", "secretKeyRef", "authorization_function"],
)  # fmt: skip
def test_harmless_names(name):
    assert not is_secret_key(name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://alice:pa@ss@mlflow.example.com:5000/x", "https://***@mlflow.example.com:5000/x"),
        ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("https://ghp_TOKEN@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("http://h/p?page=2&token=abc&x=1", "http://h/p?page=2&token=***&x=1"),
        ("https://a.blob.core.windows.net/c?sv=2020&sig=XYZ", "https://a.blob.core.windows.net/c?sv=2020&sig=***"),
        ("https://maps/api?key=AIza", "https://maps/api?key=***"),
        ("--set data.storage_options.secret=S --password=P", "--set data.storage_options.secret=*** --password=***"),
        ("{'key': 'AKIA', 'anon': 'x'}", "{'key': '***', 'anon': 'x'}"),
        ("Authorization: Bearer abc.def", "Authorization: Bearer ***"),
        ("http://127.0.0.1:9 is unreachable", "http://127.0.0.1:9 is unreachable"),
        ("s3://bucket/a@b.tar num_tokens=5 key_field=key", "s3://bucket/a@b.tar num_tokens=5 key_field=key"),
    ],
)  # fmt: skip
def test_redact_text(text, expected):
    assert redact_text(text) == expected


def test_redact_masks_secret_keys_and_storage_options_in_any_nesting_and_keeps_the_rest():
    value = {
        "data": {
            "storage_options": {
                "key": "AKIA",
                "anon": True,
                "client_kwargs": {"endpoint_url": "http://minio"},
            },
            "key_field": "key",
        },
        "tracking": {"tracking_uri": "https://u:p@host/", "experiment": "x"},
        "runs": [{"db": {"password": "pw", "port": 5432}}, "https://t@h/x"],
        "headers": {"Authorization": "Bearer t"},
        "empty_token": "",
    }
    assert redact(value) == {
        "data": {
            "storage_options": {"key": MASK, "anon": True, "client_kwargs": {"endpoint_url": MASK}},
            "key_field": "key",
        },
        "tracking": {"tracking_uri": "https://***@host/", "experiment": "x"},
        "runs": [{"db": {"password": MASK, "port": 5432}}, "https://***@h/x"],
        "headers": {"Authorization": MASK},
        "empty_token": "",
    }
    assert value["data"]["storage_options"]["key"] == "AKIA"  # a copy: the config is untouched


def test_redact_argv_masks_whole_values():
    args = [
        "run",
        "--set",
        "data.storage_options={key: K, secret: S}",
        "--api-key",
        "K2",
        "--set",
        "corpus.num=3",
    ]
    assert redact_argv(args) == [
        "run",
        "--set",
        "data.storage_options=***",
        "--api-key",
        MASK,
        "--set",
        "corpus.num=3",
    ]
