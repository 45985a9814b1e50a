"""notebooks/quickstart.ipynb executed top to bottom (nbclient): it runs the real tiny
workflow (`uniloom run`: corpus, MingTok training, Ray Data, the four-stage recipe on
Ray Train + DeepSpeed, evaluation, registration) with small budgets; then the workflow
run again skips every stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BUDGETS = [
    "corpus.num=320", "corpus.shards=4", "tokenizer.steps=40", "tokenizer.probe_train=60",
    "tokenizer.probe_test=30", "tokenizer.eval_limit=40", "train.stages.align.steps=3",
    "train.stages.joint.steps=3", "train.stages.sft.steps=2", "train.stages.edit.steps=2",
    "train.checkpoint_every=5", "train.curve_scenes=2", "eval.scenes=4", "eval.val_scenes=4", "eval.flow_steps=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    import nbclient
    import nbformat

    work = tmp_path_factory.mktemp("quickstart")
    os.environ.update(UNILOOM_WORKSPACE=str(work / "ws"), UNILOOM_QUICKSTART_SET=json.dumps(BUDGETS))
    try:
        notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
        nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()  # fmt: skip
    finally:
        del os.environ["UNILOOM_WORKSPACE"], os.environ["UNILOOM_QUICKSTART_SET"]
    nbformat.write(notebook, work / "quickstart.executed.ipynb")
    return work, notebook


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
    assert sorted(r.info.run_name for r in children) == sorted(
        ["corpus", "tokenizer", "data", "train", "eval", "register"]
    )
    # The learning curve: validation scores at each stage's end, both workers in lock step.
    (train_run,) = client.search_runs(
        [parents[0].info.experiment_id], "attributes.run_name LIKE 'univision-tiny-%'"
    )
    curve = client.get_metric_history(train_run.info.run_id, "curve/geneval_overall")
    assert [m.step for m in curve] == [3, 6, 8, 10]
    assert client.get_metric_history(train_run.info.run_id, "curve/edit_success_3")
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
    # shards and run, rightly).
    retrained = subprocess.run(
        [*command, "--set", "tokenizer.seed=1"], capture_output=True, text=True, timeout=900
    )
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    summary = json.loads(retrained.stdout.strip().splitlines()[-1])
    assert summary["ran"] == ["tokenizer", "data", "train", "eval", "register"], summary
    runs = sorted(p.name for p in (work / "ws" / "ray_results").glob("univision-tiny-*"))
    assert len(runs) == 2, runs
