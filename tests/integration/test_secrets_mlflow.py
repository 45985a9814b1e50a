"""A password in the tracking URI and keys in `data.storage_options`, against a real
MLflow server (SQLite store, local artifacts, basic auth): the run logs through it, and
neither secret is anywhere in the server's files or in what was printed."""

import mlflow
import pytest
from mlflowserver import MlflowServer

from uniloom.pipelines.commands.data import _log_run
from uniloom.pipelines.commands.options import emit
from uniloom.pipelines.commands.run import summarize
from uniloom.pipelines.config import load_config
from uniloom.pipelines.tracking import RunLogger, stage_run
from uniloom.pipelines.workflow import Stage, StageResult, run_workflow

pytestmark = pytest.mark.integration

PASSWORD = "planted-password-4b1e"
SECRET = "planted-s3-secret-a93d"


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path / "server", "alice", PASSWORD).start()
    yield s
    s.stop()


def test_credentials_reach_the_server_and_nothing_else(server, tmp_path, capfd, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(name, raising=False)  # set by the code under test; restored after
    before = mlflow.get_tracking_uri()
    cfg = load_config(
        "tiny", overrides=[f"workspace={tmp_path / 'ws'}", f"tracking.tracking_uri={server.uri()}"]
    )
    cfg.data.storage_options = {"key": "AKIA0001", "secret": SECRET}

    output = f"s3://AKIA0001:{SECRET}@bucket/shards"
    data_summary = {
        "output": output, "errors": [f"{output}/a.tar: access denied"], "output_rows": 1,
        "rows": {"read": 1, "written": 1, "quarantined": 0, "filtered": {}}, "shards": {"committed": 1},
        "images_per_s": 1.0, "seconds": 1.0, "ray_startup_s": 0.0,
    }  # fmt: skip

    def stage(cfg, upstream):
        with stage_run(cfg, "data", tags={"uniloom.output": output}):
            _log_run(data_summary)  # `uniloom data run`'s metrics and summary artifact
        return StageResult(metrics={"rows": 1.0})

    try:
        reports, parent = run_workflow(cfg, [Stage("data", ("data",), stage)])
        emit(summarize(cfg, reports, parent, 1.0), as_json=True)
        # A Ray Train worker's handle on the run, in a process MLflow's link printing was
        # not already silenced in.
        monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
        logger = RunLogger(server.uri(), parent, active=True)
        logger.metrics({"loss": 1.0}, step=1)
        logger.close()
        run = mlflow.MlflowClient(server.uri()).get_run(parent)
    finally:
        mlflow.set_tracking_uri(before)

    assert run.data.params["tracking.tracking_uri"] == f"http://***@127.0.0.1:{server.port}"
    assert run.data.params["data.storage_options.secret"] == "***" and run.data.metrics["loss"] == 1.0
    artifacts = [p for p in (server.root / "artifacts").rglob("*") if p.is_file()]
    assert artifacts, "the stage's artifact was not stored by the server"
    out, err = capfd.readouterr()
    assert f"http://***@127.0.0.1:{server.port}" in out  # the summary names the server, redacted
    for planted in (PASSWORD, SECRET):
        stored = [
            str(p) for p in server.root.rglob("*") if p.is_file() and planted.encode() in p.read_bytes()
        ]
        assert stored == [] and planted not in out + err
