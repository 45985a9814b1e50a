"""A real MLflow tracking server (SQLite store, basic auth) that dies while a stage's run is
going: the stage keeps its work and says at the end what was not logged. (An unreachable
server at the start fails the stage at once, naming the URI: tests/pipelines/test_workflow.py.)"""

import json
import random
from dataclasses import asdict

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflowserver import MlflowServer

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.cli import cli
from uniloom.pipelines.config import CorpusConfig
from uniloom.pipelines.corpus.synth import synthesize
from uniloom.pipelines.data import runner
from uniloom.pipelines.data.image_tokenizer import Encoder, save_random_weights
from uniloom.pipelines.data.manifest import Manifest
from uniloom.pipelines.data.prepare import Prepare
from uniloom.pipelines.data.source import read_marked
from uniloom.pipelines.tracking import RunLogger

pytestmark = pytest.mark.integration

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip
PASSWORD = "mlflow-down-password"


@pytest.fixture
def server(tmp_path, monkeypatch):
    # MLflow's retries of a failed request, kept short: minutes by default
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(name, raising=False)  # set by the code under test; restored after
    before = mlflow.get_tracking_uri()
    s = MlflowServer(tmp_path / "server", "alice", PASSWORD).start()
    yield s
    s.stop()
    mlflow.set_tracking_uri(before)


def test_a_data_run_whose_tracking_server_dies_commits_everything_and_says_what_was_not_logged(
    server, tmp_path, monkeypatch
):
    corpus = tmp_path / "corpus"
    synthesize(CorpusConfig(num=16, shards=2, size=32, seed=3), corpus)
    config = {
        "workspace": str(tmp_path / "ws"),
        "tracking": {"tracking_uri": server.uri()},
        "data": {"tokenizer_weights": save_random_weights(SMALL, str(tmp_path / "w.safetensors"))},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    def execute_once_the_server_is_gone(cfg, todo, text, committer):
        """runner.execute without Ray (the stages in this process), after the server died."""
        server.stop()
        prep = Prepare(cfg.data, cfg.mingtok.image_size, text)
        enc = Encoder(asdict(cfg.mingtok), cfg.data.tokenizer_weights, {}, asdict(cfg.data.exec), "float32")
        blocks = [enc(prep(b)) for s in todo for b in read_marked(s, cfg.data)]
        random.Random(0).shuffle(blocks)
        for block in blocks:
            committer.add(block)
        committer.finish()
        return 0.0

    monkeypatch.setattr(runner, "execute", execute_once_the_server_is_gone)
    out = tmp_path / "out"
    args = [
        "data",
        "run",
        "--input",
        str(corpus),
        "--output",
        str(out),
        "--config",
        str(tmp_path / "config.yaml"),
    ]
    result = CliRunner().invoke(cli, [*args, "--set", "data.bpe_vocab_size=300", "--json"])

    assert result.exception is None, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["shards"]["processed"] == 2 and summary["errors"] == []
    assert summary["output_rows"] == sum(
        e["rows"]["written"] for e in Manifest.load(str(out), {}).shards.values()
    )
    warning = result.stderr.strip().splitlines()[-1]
    assert warning.startswith(f"warning: MLflow tracking server http://***@127.0.0.1:{server.port} failed")
    assert warning.endswith("not logged: the run's metrics and summary, the run's end")
    assert PASSWORD not in result.stdout + result.stderr
    assert mlflow.active_run() is None  # ended here, though the server could not be told


def test_a_training_runs_logger_outlives_its_tracking_server(server, capfd):
    """Rank 0's RunLogger (what the Ray Train loop logs through): after the server is gone,
    a call fails once past MLflow's retries, later calls are skipped, nothing raises."""
    client = mlflow.MlflowClient(server.uri())
    run = client.create_run(client.create_experiment("down"))
    logger = RunLogger(server.uri(), run.info.run_id, active=True)
    logger.metrics({"loss": 2.0}, step=1)
    assert client.get_metric_history(run.info.run_id, "loss")[0].value == 2.0
    server.stop()
    logger.metrics({"loss": 1.5}, step=2)
    logger.metrics({"loss": 1.0}, step=3)  # within the pause: not even tried
    logger.close()
    assert logger.log.lost == ["metrics at step 2", "metrics at step 3", "the run's end"]
    assert "not logged: metrics at step 2, metrics at step 3, the run's end" in capfd.readouterr().err
