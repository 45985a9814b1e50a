"""Fault tolerance of training on Ray Train (in this process's local Ray): a training
worker killed mid-run (SIGKILL) is replaced and training restores from the last registered
checkpoint and finishes, in the same MLflow run; then the same 2-worker run is resumed on
1 worker, mid-stage (ZeRO 2 partitions and expert slices merged, optimizer state, step
count and loss curve carried on)."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from trainshards import config_file, make_shards

from uniloom.pipelines.config import load_config

pytestmark = pytest.mark.integration

STEPS = 12
EVERY_PART = "[projector, flow_head, llm, semantic_decoder]"  # the experts train too


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local):
    data = make_shards(tmp_path_factory.getbasetemp() / "train-shards", ray_local)
    work = tmp_path_factory.mktemp("faults")
    path = config_file(
        work / "train.yaml", data, work / "ws", zero_stage=2, checkpoint_every=3, max_failures=1
    )
    return work, path


def config(path: Path, steps: int):
    sets = [f"train.stages.align.trainable={EVERY_PART}", f"train.stages.align.steps={steps}"]
    return load_config("tiny", path, sets)


def registered(run_dir: Path) -> list[str]:
    """Checkpoints Ray Train has registered (what a restart restores from)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not there yet, or being rewritten
        return []
    return [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]


def training_workers() -> list[psutil.Process]:
    """This process's Ray Train workers (the local Ray's raylet is our child)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_killed_worker_is_replaced_and_training_finishes_from_the_checkpoint(setup, monkeypatch, report):
    from mlflow.tracking import MlflowClient

    from uniloom.pipelines.train.trainer import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # train() points MLflow at the workspace
    work, path = setup
    run_dir = work / "ws" / "ray_results" / "univision-tiny"
    killed: dict = {}

    def kill_after_first_checkpoint():
        deadline = time.time() + 600
        while not registered(run_dir) and time.time() < deadline:
            time.sleep(0.2)
        victims = training_workers()
        killed["checkpoint"], killed["workers"] = registered(run_dir)[-1], len(victims)
        os.kill(victims[-1].pid, signal.SIGKILL)
        killed["step"] = json.loads((run_dir / killed["checkpoint"] / "meta.json").read_text())["global_step"]

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    summary = train(config(path, STEPS), stage=1, workers=2, echo=lambda line: None)
    killer.join(timeout=5)
    assert killed["workers"] == 2
    restored_at = killed["step"]  # (checkpoints beyond keep_checkpoints are deleted by the end)
    assert summary["global_step"] == STEPS and summary["stage"] == "align" and summary["workers_last"] == 2
    # The replacement group restored the checkpoint registered when the worker died (or a
    # later one, had the controller registered it before noticing the death).
    assert len(summary["resumes"]) == 1 and summary["resumes"][0]["global_step"] >= restored_at
    steps = [s for s, *_ in summary["loss_curve"]]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'ws' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]  # no duplicate run
    assert max(m.step for m in client.get_metric_history(summary["mlflow_run_id"], "loss")) == STEPS
    report(f"worker killed after {killed['checkpoint']}; restored at step {summary['resumes'][0]['global_step']}, "
           f"finished {STEPS} steps in {summary['seconds']} s")  # fmt: skip


def test_the_two_worker_run_resumes_on_one_worker(setup, monkeypatch, report):
    from uniloom.pipelines.train.trainer import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    work, path = setup
    latest = registered(work / "ws" / "ray_results" / "univision-tiny")[-1]
    before = json.loads((work / "ws" / "ray_results" / "univision-tiny" / latest / "meta.json").read_text())
    assert (before["world"], before["ep"], before["step"]) == (2, 2, STEPS)
    more = STEPS + 4  # raising a finished stage's steps continues it, optimizer and all
    lines: list[str] = []
    summary = train(config(path, more), stage=1, workers=1, echo=lines.append)
    assert f"continuing stage align step {STEPS} (2 workers)" in "\n".join(lines)
    assert summary["workers_last"] == 1 and summary["global_step"] == more
    assert summary["resumes"][-1] == {"global_step": STEPS, "workers": 1}
    curve = summary["loss_curve"]
    assert curve[: len(before["losses"])] == before["losses"]  # the loss curve carries on
    assert [s for s, *_ in curve][-1] == more
    meta = json.loads((Path(summary["checkpoint"]) / "meta.json").read_text())
    assert (meta["world"], meta["ep"]) == (1, 1)
    report(f"2 -> 1 worker resume: steps {STEPS} -> {more}, loss {before['losses'][-1][2]} -> {curve[-1][2]}")
