"""The quickstart notebook's workflow run (`uniloom run` with small budgets, executed by
nbclient): shared by every test that needs a finished local tiny workflow."""

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["corpus", "tokenizer", "data", "train", "eval", "register"]
BUDGETS = [
    "corpus.num=320", "corpus.shards=4", "tokenizer.steps=40", "tokenizer.probe_train=60",
    "tokenizer.probe_test=30", "tokenizer.eval_limit=40", "train.stages.align.steps=3",
    "train.stages.joint.steps=3", "train.stages.sft.steps=2", "train.stages.edit.steps=2",
    "train.checkpoint_every=5", "train.curve_scenes=2", "eval.scenes=4", "eval.val_scenes=4", "eval.flow_steps=2",
]  # fmt: skip


def run_quickstart(work: Path):
    """Execute notebooks/quickstart.ipynb with its workspace in `work`/ws; the notebook."""
    import nbclient
    import nbformat

    os.environ.update(UNILOOM_WORKSPACE=str(work / "ws"), UNILOOM_QUICKSTART_SET=json.dumps(BUDGETS))
    try:
        notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
        nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()  # fmt: skip
    finally:
        del os.environ["UNILOOM_WORKSPACE"], os.environ["UNILOOM_QUICKSTART_SET"]
    nbformat.write(notebook, work / "quickstart.executed.ipynb")
    return notebook
