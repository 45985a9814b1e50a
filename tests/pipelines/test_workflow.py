"""The workflow runner: fingerprints, skips, reruns downstream of a change, MLflow runs;
the train stage's Ray Train run."""

import copy

import mlflow
import pytest

from uniloom.pipelines.config import load_config
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.workflow import Stage, StageResult, run_workflow
from uniloom.pipelines.workflow_stages import train_config


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


@pytest.fixture
def train_inputs(tmp_path):
    """The tiny config and what the train stage gets from upstream: MingTok weights and
    a data run's manifest (one shard entry)."""
    from uniloom.pipelines.data.image_tokenizer import save_random_weights

    cfg = load_config("tiny", overrides=[f"workspace={tmp_path}"])
    weights = save_random_weights(cfg.mingtok, str(tmp_path / "mingtok.safetensors"))
    shards = _manifest(tmp_path / "data", "0" * 16)
    return cfg, {"tokenizer": StageResult({"weights": weights}), "data": StageResult({"shards": shards})}


def _manifest(folder, shard_fingerprint: str) -> str:
    from uniloom.pipelines.data.manifest import Manifest

    manifest = Manifest(str(folder), {})
    manifest.shards["shard-0"] = {"fingerprint": shard_fingerprint}
    manifest.save()
    return str(folder)


def test_the_train_stage_runs_a_new_ray_train_run_when_what_decides_the_weights_changes(
    train_inputs, tmp_path
):
    """A rerun with the same inputs resumes the same run; a changed train, model, shards or
    MingTok gets a run of its own (the old run, finished, would train nothing and export
    its old checkpoint under the new config); where the run is kept or whether it is
    registered does not."""
    from uniloom.pipelines.data.image_tokenizer import save_random_weights

    cfg, done = train_inputs
    name = train_config(cfg, done).train.run_name
    assert name.startswith("univision-tiny-") and train_config(cfg, done).train.run_name == name

    def run_name(edit) -> str:
        c, d = copy.deepcopy(cfg), copy.deepcopy(done)
        edit(c, d)
        return train_config(c, d).train.run_name

    def sft_steps(c, d):
        c.train.stages["sft"].steps += 1

    def init_std(c, d):
        c.model.init_std *= 2

    def seed(c, d):
        c.train.seed += 1

    def shards(c, d):
        d["data"].outputs["shards"] = _manifest(tmp_path / "data2", "1" * 16)

    def mingtok(c, d):
        d["tokenizer"].outputs["weights"] = save_random_weights(
            c.mingtok, str(tmp_path / "m2.safetensors"), 1
        )

    for edit in (sft_steps, init_std, seed, shards, mingtok):
        assert run_name(edit) != name, edit.__name__

    def operational(c, d):
        c.train.register = False
        c.train.export = str(tmp_path / "elsewhere.safetensors")
        c.train.keep_checkpoints += 1
        c.eval.scenes += 1

    assert run_name(operational) == name

    def explicit(c, d):
        c.train.run_name = "mine"

    assert run_name(explicit) == "mine"
