"""A workspace on object storage (moto's S3 server on 127.0.0.1): the workflow state is
versioned objects, MLflow tracks to a server (a real one on 127.0.0.1) and stores
artifacts beside the workspace, every stage's outputs are in the bucket (only logs and
caches stay on this node). The whole `uniloom run` on a bucket, its rows against a run in
a local folder and a rerun that skips every stage: test_cluster_share_nothing.py."""

import json

import mlflow
import pytest
import s3fs
from mlflowserver import MlflowServer

from uniloom.pipelines.config import load_config
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.workflow import Stage, StageResult, State, run_workflow

pytestmark = pytest.mark.integration

BUCKET = "workspace-bucket"


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The bucket, and the environment MLflow's S3 client reads (boto3: it takes no
    storage options) pointed at moto."""
    fs = s3fs.S3FileSystem(**s3_server)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set by the code under test
    return fs, s3_server


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path / "server", "alice", "password-of-alice").start()
    yield s
    s.stop()


def _config(workspace: str, server: MlflowServer, options: dict):
    cfg = load_config("tiny", overrides=[f"workspace={workspace}"])
    cfg.data.storage_options = options
    cfg.tracking.tracking_uri = server.uri()
    return cfg


def test_state_and_artifacts_on_the_object_store(s3, server, tmp_path, monkeypatch):
    fs, options = s3
    workspace = f"s3://{BUCKET}/state-and-artifacts"
    monkeypatch.chdir(tmp_path)  # a relative path written by mistake would land here
    calls = []

    def corpus(cfg, upstream):
        calls.append("corpus")
        fs.pipe_file(f"{BUCKET}/state-and-artifacts/corpus/0.tar", b"tar")
        mlflow.log_dict({"rows": 3}, "summary.json")
        return StageResult(outputs={"corpus": f"{workspace}/corpus/0.tar"}, metrics={"rows": 3.0})

    def data(cfg, upstream):
        calls.append("data")
        return StageResult(metrics={"rows": upstream["corpus"].metrics["rows"]})

    stages = [Stage("corpus", ("corpus",), corpus), Stage("data", ("data",), data, ("corpus",))]
    cfg = _config(workspace, server, options)
    before = mlflow.get_tracking_uri()
    try:
        reports, _ = run_workflow(cfg, stages)
        assert [r.status for r in reports] == ["ran", "ran"]
        again, _ = run_workflow(cfg, stages)
        corpus_run = mlflow.MlflowClient(server.uri()).get_run(
            State(workspace, options).stages["corpus"]["mlflow_run_id"]
        )
    finally:
        mlflow.set_tracking_uri(before)

    assert [r.status for r in again] == ["skipped", "skipped"] and calls == ["corpus", "data"]
    # one state version per finished stage, the newest holding both
    versions = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/state-and-artifacts/workflow"))
    assert versions == ["000001.json", "000002.json"]
    newest = json.loads(fs.cat_file(f"{BUCKET}/state-and-artifacts/workflow/000002.json"))
    assert sorted(newest["stages"]) == ["corpus", "data"]
    # the artifact is on the workspace's store, not the server's folder or this node's
    artifacts = f"{workspace}/mlartifacts"
    assert corpus_run.info.artifact_uri.startswith(artifacts)
    stored = fs.find(f"{BUCKET}/state-and-artifacts/mlartifacts")
    assert any(p.endswith("/artifacts/summary.json") for p in stored), stored
    assert not any(p.is_file() for p in (server.root / "artifacts").rglob("*"))
    assert [p.name for p in tmp_path.iterdir()] == ["server"]

    # a second writer of the same workspace fails instead of dropping the other's stages
    first, second = State(workspace, options), State(workspace, options)
    first.record("eval", "fp", StageResult(), 1.0, None)
    with pytest.raises(UniloomError, match=r"^s3://\S+/workflow/000003.json was written by another run"):
        second.record("eval", "fp", StageResult(), 1.0, None)


def test_a_remote_workspace_with_a_store_on_this_node_fails_before_writing(s3, tmp_path):
    fs, options = s3
    cfg = load_config("tiny", overrides=[f"workspace=s3://{BUCKET}/refused"])
    cfg.data.storage_options = options
    with pytest.raises(UniloomError, match="no MLflow tracking server is given"):
        run_workflow(cfg, [Stage("corpus", ("corpus",), lambda cfg, up: StageResult())])
    assert not fs.exists(f"{BUCKET}/refused")
