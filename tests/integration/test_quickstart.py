"""notebooks/quickstart.ipynb executed top to bottom (nbclient): it runs the real tiny
workflow (`uniloom run`: corpus, MingTok training, Ray Data, the four-stage recipe on
Ray Train + DeepSpeed, evaluation, registration) with small budgets; then the workflow
run again skips every stage."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from workflowrun import BUDGETS, STAGES

pytestmark = pytest.mark.integration


def _outputs(notebook, kind: str):
    return [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if kind in o.get("data", {})
    ]


def test_the_notebook_runs_and_shows_its_images_inline(quickstart):
    _, notebook = quickstart
    errors = [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if o.output_type == "error"
    ]
    assert not errors
    # corpus preview, originals + reconstructions, the generated image, the two edit rounds
    assert len(_outputs(notebook, "image/png")) == 5
    assert _outputs(notebook, "text/html")  # the MLflow runs table


def test_the_workflow_registered_both_models_and_a_rerun_skips_every_stage(quickstart, report):
    from mlflow.tracking import MlflowClient

    work, _ = quickstart
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'ws' / 'mlflow.db'}")
    assert {m.name for m in client.search_registered_models()} == {"uniloom-mingtok", "uniloom-univision"}
    parents = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
               if "mlflow.parentRunId" not in r.data.tags]  # fmt: skip
    children = client.search_runs(
        [parents[0].info.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    # The learning curve: validation scores at each stage's end, both workers in lock step.
    (train_run,) = client.search_runs(
        [parents[0].info.experiment_id], "attributes.run_name LIKE 'univision-tiny-%'"
    )
    curve = client.get_metric_history(train_run.info.run_id, "curve/geneval_overall")
    assert [m.step for m in curve] == [3, 6, 8, 10]
    assert client.get_metric_history(train_run.info.run_id, "curve/edit_success_3")
    # Lineage: the shards the run trained on, and on the registered version its data,
    # tokenizer and evaluation.
    (shards,) = client.get_run(train_run.info.run_id).inputs.dataset_inputs
    version = client.get_model_version("uniloom-univision", "1")
    assert version.tags["data.fingerprint"] == shards.dataset.digest
    assert version.tags["tokenizer.version"] == "1"
    assert float(version.tags["eval.vqa_accuracy"]) >= 0 and "Evaluation: " in version.description
    mingtok = client.get_model_version("uniloom-mingtok", "1")
    assert float(mingtok.tags["eval.psnr"]) > 0 and mingtok.tags["data.fingerprint"]
    # the weights' fingerprint, by which a standalone `uniloom train` finds this version
    assert mingtok.tags["weights.fingerprint"] == version.tags["image_tokenizer"]
    (eval_run,) = [r for r in children if r.info.run_name == "eval"]
    samples = json.loads(
        Path(client.download_artifacts(eval_run.info.run_id, "eval/samples.json", str(work))).read_text()
    )
    assert samples["columns"] == ["prompt", "category", "passed", "image"]
    assert {row[1] for row in samples["data"]} >= {"edit_round_1", "edit_round_3"}
    command = [
        str(Path(sys.executable).with_name("uniloom")),
        "run",
        "--workspace",
        str(work / "ws"),
        "--json",
    ]
    for override in BUDGETS:
        command += ["--set", override]
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["ran"] == [] and len(summary["skipped"]) == 6
    assert "unchanged" in again.stderr
    report(f"uniloom run again on an unchanged workspace: every stage skipped in {summary['seconds']} s")
    # A retrained MingTok makes new shards: training starts a run of its own (named after
    # the MingTok) rather than meeting the first run's checkpoints. Another seed: with a
    # step budget, retraining the same config can give the same weights (and then the same
    # shards and run, rightly). Run as `make demo` runs it (no --json), every stage forced.
    as_demo = [part for part in command if part != "--json"]
    retrained = subprocess.run([*as_demo, "--set", "tokenizer.seed=1", "--force", "corpus"],
                               capture_output=True, text=True, timeout=900)  # fmt: skip
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    statuses = dict(re.findall(r"^(\w+) +(ran|skipped) ", retrained.stderr, re.MULTILINE))
    assert statuses == dict.fromkeys(STAGES, "ran"), retrained.stderr
    runs = sorted(p.name for p in (work / "ws" / "ray_results").glob("univision-tiny-*"))
    assert len(runs) == 2, runs
    # The terminal: a few lines per stage (not a terminal here: the start, each quarter,
    # the end) and the summary; Ray's, DeepSpeed's and MLflow's output in the stages' logs.
    printed = retrained.stdout.splitlines() + retrained.stderr.splitlines()
    report(f"uniloom run, every stage: {len(printed)} lines printed")
    assert len(printed) <= 60, retrained.stderr
    for noise in (
        "core_worker.cc",
        "Warning",
        "WARNING",
        "Reporting training result",
        "Execution plan",
        "DeepSpeed",
    ):
        assert noise not in retrained.stderr, noise
    logs = {name: (work / "ws" / "logs" / f"{name}.log").read_text() for name in STAGES}
    assert "Checkpoint successfully created" in logs["train"] and "DeepSpeed" in logs["train"]
    assert re.search(r"\[train\] 10/10 steps, loss ", logs["train"])  # a worker's progress, via Ray
    assert re.search(r"\[tokenizer\] 40/40 steps, loss ", logs["tokenizer"])
    assert "Execution plan of Dataset" in logs["data"]
    for name in STAGES:
        assert f"[{name}] done in " in retrained.stderr
