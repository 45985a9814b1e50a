"""Per-stage code fingerprints (pipelines/codehash.py): each workflow stage's fingerprint
covers the code it runs and nothing else, and the data stage's hand list of row code
(pipelines/data/manifest.py CODE) misses no module its row computation imports.

Edits are made to a copy of the packages, never to the tree under test."""

import ast
import shutil

import pytest

from uniloom.pipelines.codehash import Sources, package_roots
from uniloom.pipelines.workflow import code_fingerprint
from uniloom.pipelines.workflow_stages import workflow_stages


@pytest.fixture
def copy(tmp_path):
    """Sources over a copy of the uniloom packages, and a function to edit a file in it."""
    roots = {}
    for package, root in package_roots().items():
        roots[package] = tmp_path / package
        shutil.copytree(root, roots[package], ignore=shutil.ignore_patterns("__pycache__"))

    def edit(package: str, relative: str, text: str = "\n# edited\n") -> None:
        path = roots[package] / relative
        path.write_text(path.read_text() + text)

    return roots, edit


def stage_fingerprints(roots) -> dict[str, str]:
    sources = Sources(roots)
    return {stage.name: code_fingerprint(stage.run, sources) for stage in workflow_stages()}


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [name for name in before if before[name] != after[name]]


def test_an_edit_reruns_only_the_stages_that_run_the_edited_code(copy):
    roots, edit = copy
    base = stage_fingerprints(roots)
    assert base == stage_fingerprints(package_roots())  # the copy hashes as the original
    assert stage_fingerprints(roots) == base  # and the same code hashes the same

    # The evaluation's report: eval runs it, and so does train, whose learning curves log
    # their sample grids with it; nothing upstream reruns.
    edit("uniloom.pipelines", "evaluate/report.py")
    after = stage_fingerprints(roots)
    assert changed(base, after) == ["train", "eval", "register"]

    edit("uniloom.models", "mingtok.py")  # the tokenizer, which every later stage runs
    assert changed(after, stage_fingerprints(roots)) == ["tokenizer", "data", "train", "eval", "register"]


def test_a_stage_s_own_glue_and_package_data_count_for_that_stage_only(copy):
    """workflow_stages.py holds every stage's glue: a stage counts the functions, constants
    and imports of it that it reaches, not the others' (nor the module docstring)."""
    roots, edit = copy
    path = roots["uniloom.pipelines"] / "workflow_stages.py"

    def replace(old: str, new: str) -> None:
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))

    base = stage_fingerprints(roots)
    replace("corpus seed {cfg.corpus.seed}", "seed {cfg.corpus.seed}")  # in _eval
    assert changed(base, after := stage_fingerprints(roots)) == ["eval"]
    replace('NOT_WEIGHTS = ("shards", ', 'NOT_WEIGHTS = ("shards", "seed", ')  # a constant _train uses
    assert changed(after, after := stage_fingerprints(roots)) == ["train"]
    replace('"""', '"""Edited. ')  # the module docstring
    assert stage_fingerprints(roots) == after

    edit("uniloom.pipelines", "assets/photos.yaml")  # opened by corpus/synth.py by name
    assert changed(after, stage_fingerprints(roots)) == ["corpus"]


def test_a_module_a_stage_imports_inside_a_function_is_in_its_fingerprint(copy):
    """A new module, imported where it is used (deferred), joins the closure of the stages
    that run report.py (eval, and train for its grids), and editing it reruns them."""
    roots, edit = copy
    (roots["uniloom.pipelines"] / "evaluate" / "extra.py").write_text("SCALE = 1\n")
    edit(
        "uniloom.pipelines",
        "evaluate/report.py",
        "\n\ndef scale():\n    from .extra import SCALE\n\n    return SCALE\n",
    )
    sources = Sources(roots)
    run = {stage.name: stage.run for stage in workflow_stages()}
    assert "uniloom.pipelines.evaluate.extra" in sources.function(run["eval"])[1]
    assert "uniloom.pipelines.evaluate.extra" not in sources.function(run["tokenizer"])[1]
    base = stage_fingerprints(roots)
    edit("uniloom.pipelines", "evaluate/extra.py", "SCALE = 2\n")
    assert changed(base, stage_fingerprints(roots)) == [
        "train",
        "eval",
        "register",
    ]  # train's grids use report.py


# Modules the data stage's row computation imports that do not decide what a row holds,
# each with the reason; everything else it imports must be in manifest.CODE.
NOT_ROW_CODE = {
    "uniloom.pipelines.config": "builds the config; config_hash hashes the values",
    "uniloom.pipelines.data.config": "the data section; config_hash hashes its values",
    "uniloom.pipelines.evaluate.config": "a section the data stage does not read",
    "uniloom.pipelines.tokenizer.config": "a section the data stage does not read",
    "uniloom.pipelines.train.config": "a section the data stage does not read",
    "uniloom.models.univision_config": "a section the data stage does not read",
    "uniloom.kernels": "model.kernels' validation, for that section",
    "uniloom.kernels.rms_norm": "RMSNorm of models/blocks.py, which MingTok does not use",
    "uniloom.kernels._triton_rms_norm": "RMSNorm of models/blocks.py, which MingTok does not use",
    "uniloom.models.special_tokens": "the BPE's reserved tokens: the BPE is hashed as data",
    "uniloom.pipelines.tokenizer.weights": "the default weights path: the weights are hashed",
    "uniloom.pipelines.errors": "error types and messages",
    "uniloom.pipelines.data.fs": "file system access",
    "uniloom.pipelines.data.lock": "one writer per output",
    "uniloom.pipelines.process": "whether a lease owner still runs",
    "uniloom.pipelines.data.manifest": "the fingerprint bookkeeping itself",
}
# What pipelines/data/runner.py wires together per row: the read task, the prepare and
# encode stages, and the committer that splits, dedups and writes the rows.
ROW_ENTRIES = [
    "uniloom.pipelines.data.source",
    "uniloom.pipelines.data.prepare",
    "uniloom.pipelines.data.image_tokenizer",
    "uniloom.pipelines.data.commit",
]


def _empty_package(sources: Sources, module: str) -> bool:
    path = sources.path(module)
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body
    )


def test_the_data_stage_fingerprints_every_module_its_rows_are_computed_by():
    from uniloom.pipelines.data.manifest import CODE

    sources = Sources()
    listed = {f"{package}.{name.removesuffix('.py')}" for package, names in CODE.items() for name in names}
    imported = sources.closure(ROW_ENTRIES)
    missing = [
        m for m in imported if m not in listed and m not in NOT_ROW_CODE and not _empty_package(sources, m)
    ]
    assert not missing, f"imported by the data stage's row code but not in manifest.CODE: {missing}"
    assert not listed - set(imported), "manifest.CODE lists modules the row code does not import"
    assert set(NOT_ROW_CODE) <= set(imported), "NOT_ROW_CODE names a module the row code no longer imports"
