"""`uniloom data`: one-line errors for what a user can fix, before any work starts."""

import pytest


@pytest.fixture
def corpus(tmp_path):
    from uniloom.pipelines.config import CorpusConfig
    from uniloom.pipelines.corpus.synth import synthesize

    synthesize(CorpusConfig(num=4, shards=1, size=32), tmp_path / "corpus")
    return tmp_path


def test_help_lists_run_and_status(cli):
    out = cli("data", "--help")
    assert out.returncode == 0 and "run" in out.stdout and "status" in out.stdout


def test_run_without_weights_says_how_to_get_them(cli, corpus):
    out = cli("data", "run", "--input", str(corpus / "corpus"), "--output", str(corpus / "out"),
              "--set", f"workspace={corpus / 'ws'}")  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "no tokenizer weights" in line and "uniloom tokenizer train" in line
    assert "data.tokenizer_weights" in line
    assert not (corpus / "out").exists()


def test_missing_input_and_missing_manifest_are_named(cli, corpus):
    from uniloom.models.mingtok_config import MingTokConfig
    from uniloom.pipelines.data.image_tokenizer import save_random_weights

    weights = save_random_weights(MingTokConfig(), str(corpus / "w.safetensors"))
    out = cli("data", "run", "--input", str(corpus / "nowhere"), "--output", str(corpus / "out"),
              "--set", f"data.tokenizer_weights={weights}")  # fmt: skip
    assert out.returncode == 1 and f"input {corpus / 'nowhere'} does not exist" in out.stderr
    out = cli("data", "status", str(corpus), "--json")
    assert out.returncode == 1 and "has no data manifest" in out.stderr and "Traceback" not in out.stderr
