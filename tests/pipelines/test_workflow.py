"""The workflow runner: fingerprints, skips, reruns downstream of a change, MLflow runs,
each stage's output in its log and one bar on the terminal; the train stage's Ray Train run."""

import copy
import io
import subprocess
import sys

import mlflow
import pytest

from uniloom.pipelines.config import load_config
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.terminal import Terminal
from uniloom.pipelines.workflow import Stage, StageResult, run_workflow
from uniloom.pipelines.workflow_stages import train_config


def _quiet(cfg) -> Terminal:
    return Terminal(f"{cfg.workspace}/logs", out=io.StringIO())


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
    reports, _ = run_workflow(cfg, stages, terminal=_quiet(cfg))
    assert [r.status for r in reports] == ["ran"] * 3 and calls == ["corpus", "data", "train"]

    calls.clear()
    reports, _ = run_workflow(cfg, stages, terminal=_quiet(cfg))
    assert [r.status for r in reports] == ["skipped"] * 3 and calls == []

    cfg.tracking.experiment = "other"  # read by "data" only
    reports, _ = run_workflow(cfg, stages, terminal=_quiet(cfg))
    assert [r.status for r in reports] == ["skipped", "ran", "ran"] and calls == ["data", "train"]

    calls.clear()
    (tmp_path / "train.out").unlink()  # a missing output is not fresh
    reports, _ = run_workflow(cfg, stages, force=("corpus",), terminal=_quiet(cfg))
    assert [r.status for r in reports] == ["ran", "ran", "ran"]


def test_one_parent_run_with_nested_stage_runs(tmp_path):
    cfg = load_config("tiny", overrides=[f"workspace={tmp_path}"])
    _, parent = run_workflow(cfg, _stages(tmp_path, []), terminal=_quiet(cfg))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.info.run_name for r in children) == ["corpus", "data", "train"]
    assert client.get_run(parent).data.params["corpus.num"] == "2000"
    assert all(r.data.params["fingerprint"] for r in children)

    # run inside a caller's run (`bench tokenizers --unified`): nested under it
    cfg.workspace = str(tmp_path / "second")
    cfg.tracking.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name="caller") as caller:
        _, inner = run_workflow(cfg, _stages(tmp_path, []), terminal=_quiet(cfg))
    assert client.get_run(inner).data.tags["mlflow.parentRunId"] == caller.info.run_id


def test_corrupt_state_and_unreachable_tracking_server_fail_clearly(tmp_path):
    cfg = load_config("tiny", overrides=[f"workspace={tmp_path}"])
    (tmp_path / "workflow.json").write_text("{not json")
    with pytest.raises(UniloomError, match="workflow.json is corrupt"):
        run_workflow(cfg, _stages(tmp_path, []), terminal=_quiet(cfg))
    cfg = load_config(
        "tiny", overrides=[f"workspace={tmp_path / 'b'}", "tracking.tracking_uri=http://127.0.0.1:9"]
    )
    with pytest.raises(UniloomError, match=r"http://127.0.0.1:9 is unreachable"):
        run_workflow(cfg, _stages(tmp_path, []), terminal=_quiet(cfg))


NOISY = """
import logging, os, subprocess, sys, warnings
from uniloom.pipelines.config import load_config
from uniloom.pipelines.progress import report
from uniloom.pipelines.workflow import Stage, StageResult, run_workflow

def noisy(cfg, upstream):
    print("a print on stdout")
    logging.getLogger("some.library").warning("a logged warning")
    warnings.warn("a Python warning", UserWarning)
    os.write(2, b"raw bytes on fd 2\\n")  # as C++ code writes
    subprocess.run([sys.executable, "-c", "import sys; print('child on stdout', file=sys.stdout)"], check=True)
    for done in range(0, 41, 5):
        report("noisy", done, 40, "steps", {"loss": f"{1 / (done + 1):.4f}"})
    return StageResult(metrics={"x": 1.0})

run_workflow(load_config("tiny", overrides=[f"workspace={sys.argv[1]}"]),
             [Stage("noisy", (), noisy, description="make noise")])
print("after the workflow", file=sys.stderr)
"""


def test_a_stage_output_goes_to_its_log_and_the_terminal_gets_its_progress(tmp_path):
    """Output by every route a stage's libraries take (print, logging, warnings, bytes on
    the file descriptors, a child process) lands in the stage's log; stderr, not a
    terminal here, gets a line at the start, at each quarter and at the end."""
    script = tmp_path / "noisy.py"  # a file: the workflow fingerprints the stage's code
    script.write_text(NOISY)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    log = (tmp_path / "logs" / "noisy.log").read_text()
    for line in ("a print on stdout", "a logged warning", "UserWarning: a Python warning",
                 "raw bytes on fd 2", "child on stdout", "[noisy] 40/40 steps, loss 0.0244"):  # fmt: skip
        assert line in log
    shown = run.stderr.splitlines()
    assert shown[0] == "[noisy] make noise"
    assert [line.split("%")[0] for line in shown[1:4]] == ["[noisy] 25", "[noisy] 50", "[noisy] 75"]
    assert shown[4].startswith("[noisy] done in ") and shown[4].endswith("(40/40 steps, loss 0.0244)")
    assert shown[5:] == ["after the workflow"] and run.stdout == ""
    assert "Creating initial MLflow database tables" in (tmp_path / "logs" / "workflow.log").read_text()


def test_a_failing_stage_shows_the_end_of_its_log_and_where_it_is(tmp_path):
    def failing(cfg, upstream):
        for i in range(30):
            print(f"working {i}")
        raise UniloomError("it broke")

    cfg = load_config("tiny", overrides=[f"workspace={tmp_path}"])
    out = io.StringIO()
    with pytest.raises(UniloomError, match="it broke"):
        run_workflow(cfg, [Stage("brittle", (), failing)], terminal=Terminal(tmp_path / "logs", out=out))
    shown = out.getvalue().splitlines()
    assert shown[1].startswith("[brittle] failed after ")
    assert shown[2] == f"[brittle] the last 20 lines of its log {tmp_path / 'logs' / 'brittle.log'}:"
    assert shown[3:] == [f"  working {i}" for i in range(10, 30)]
    print("after the workflow")  # stdout is this process's own again


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
