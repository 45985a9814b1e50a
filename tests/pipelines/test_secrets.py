"""Planted secrets reach neither the MLflow store nor anything printed.

A secret in `data.storage_options` goes through every path that logs the config (the
workflow's parent run, a stage run with tags), the run summary and the workflow state on
a real SQLite store; then every byte under the workspace and everything printed is
searched for it. A password in the tracking URI is covered here on the paths that print
the URI without reaching a server (errors); tests/integration/test_secrets_mlflow.py
runs it against a real server.
"""

import json
import socket

import mlflow

from uniloom.pipelines.commands.options import emit
from uniloom.pipelines.commands.run import summarize
from uniloom.pipelines.config import load_config
from uniloom.pipelines.tracking import stage_run
from uniloom.pipelines.workflow import Stage, StageResult, run_workflow

KEY_ID = "AKIAPLANTEDKEYID0001"
SECRET = "planted-s3-secret-0f9c2e"
PASSWORD = "planted-password-77d1"


def _files_containing(root, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_storage_secrets_reach_neither_the_store_nor_the_output(tmp_path, capfd):
    cfg = load_config("tiny", overrides=[f"workspace={tmp_path / 'ws'}"])
    cfg.data.storage_options = {"key": KEY_ID, "secret": SECRET, "client_kwargs": {"region_name": "eu"}}

    def stage(cfg, upstream):
        with stage_run(cfg, "data", tags={"uniloom.output": f"s3://{KEY_ID}:{SECRET}@bucket/shards"}):
            mlflow.log_metric("rows", 1.0)
        out = tmp_path / "ws" / "data.out"
        out.write_text("x")
        return StageResult(outputs={"shards": str(out)}, metrics={"rows": 1.0})

    reports, parent = run_workflow(cfg, [Stage("data", ("data",), stage)])
    summary = summarize(cfg, reports, parent, 1.0)
    emit(summary, as_json=True)
    emit(summary, as_json=False)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    params = client.get_run(parent).data.params
    assert params["data.storage_options.key"] == "***" and params["data.storage_options.secret"] == "***"
    assert params["corpus.num"] == "2000"  # the rest of the config is logged as is
    out, err = capfd.readouterr()
    assert json.loads(out.splitlines()[-len(summary) - 1])["mlflow_parent_run"] == parent
    for planted in (KEY_ID, SECRET):
        assert _files_containing(tmp_path / "ws", planted) == []
        assert planted not in out + err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_errors_naming_a_credentialed_uri_print_it_redacted(tmp_path, cli):
    port = _closed_port()
    result = cli(
        "run", "--workspace", str(tmp_path / "ws"),
        "--set", f"tracking.tracking_uri=http://alice:{PASSWORD}@127.0.0.1:{port}",
        "--set", f"data.storage_options={{key: {KEY_ID}, secret: {SECRET}}}",
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"MLflow tracking server http://***@127.0.0.1:{port} is unreachable" in result.stderr
    submitted = cli(
        "submit", "--address", f"http://alice:{PASSWORD}@127.0.0.1:{port}", "--", "corpus", "--help"
    )
    assert submitted.returncode == 1 and "error:" in submitted.stderr
    for planted in (PASSWORD, KEY_ID, SECRET):
        assert planted not in result.stdout + result.stderr + submitted.stdout + submitted.stderr
