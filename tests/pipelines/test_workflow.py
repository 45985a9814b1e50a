"""The workflow runner: fingerprints, skips, reruns downstream of a change, MLflow runs."""

import mlflow
import pytest

from uniloom.pipelines.config import load_config
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.workflow import Stage, StageResult, run_workflow


def _stages(tmp_path, calls):
    def make(name):
        def run(cfg, upstream):
            calls.append(name)
            out = tmp_path / f"{name}.out"
            out.write_text(f"{name} {sorted(upstream)}")
            return StageResult(outputs={"file": str(out)}, metrics={f"{name}_value": float(len(calls))})

        return run

    return [
        Stage("corpus", ("corpus",), make("corpus")),
        Stage("data", ("tracking.experiment",), make("data"), depends=("corpus",)),
        Stage("train", (), make("train"), depends=("data",)),
    ]


def test_unchanged_stages_skip_and_a_change_reruns_only_downstream(tmp_path):
    calls = []
    cfg = load_config("tiny", overrides=[f"workspace={tmp_path}"])
    stages = _stages(tmp_path, calls)
    reports, _ = run_workflow(cfg, stages, echo=lambda m: None)
    assert [r.status for r in reports] == ["ran"] * 3 and calls == ["corpus", "data", "train"]

    calls.clear()
    reports, _ = run_workflow(cfg, stages, echo=lambda m: None)
    assert [r.status for r in reports] == ["skipped"] * 3 and calls == []

    cfg.tracking.experiment = "other"  # read by "data" only
    reports, _ = run_workflow(cfg, stages, echo=lambda m: None)
    assert [r.status for r in reports] == ["skipped", "ran", "ran"] and calls == ["data", "train"]

    calls.clear()
    (tmp_path / "train.out").unlink()  # a missing output is not fresh
    reports, _ = run_workflow(cfg, stages, echo=lambda m: None, force=("corpus",))
    assert [r.status for r in reports] == ["ran", "ran", "ran"]


def test_one_parent_run_with_nested_stage_runs(tmp_path):
    cfg = load_config("tiny", overrides=[f"workspace={tmp_path}"])
    _, parent = run_workflow(cfg, _stages(tmp_path, []), echo=lambda m: None)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.info.run_name for r in children) == ["corpus", "data", "train"]
    assert client.get_run(parent).data.params["corpus.num"] == "2000"
    assert all(r.data.params["fingerprint"] for r in children)


def test_corrupt_state_and_unreachable_tracking_server_fail_clearly(tmp_path):
    cfg = load_config("tiny", overrides=[f"workspace={tmp_path}"])
    (tmp_path / "workflow.json").write_text("{not json")
    with pytest.raises(UniloomError, match="workflow.json is corrupt"):
        run_workflow(cfg, _stages(tmp_path, []), echo=lambda m: None)
    cfg = load_config(
        "tiny", overrides=[f"workspace={tmp_path / 'b'}", "tracking.tracking_uri=http://127.0.0.1:9"]
    )
    with pytest.raises(UniloomError, match=r"http://127.0.0.1:9 is unreachable"):
        run_workflow(cfg, _stages(tmp_path, []), echo=lambda m: None)


@pytest.mark.parametrize("server", ["closed port", "silent server"])
def test_uniloom_run_with_an_unreachable_tracking_server_fails_at_once(server, tmp_path, cli):
    """Nothing listens, or a server accepts and never answers: one line naming the URI,
    before any stage starts (the subprocess timeout is the hang guard)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if server == "silent server":
        listener.listen(8)
    else:
        listener.close()
    try:
        uri = f"http://127.0.0.1:{port}"
        result = cli(
            "run", "--workspace", str(tmp_path / "ws"), "--set", f"tracking.tracking_uri={uri}", timeout=60
        )
    finally:
        listener.close()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"MLflow tracking server {uri} is unreachable" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "ws" / "corpus").exists()
