"""`uniloom bench tokenizers` end to end at a toy size: each kind trained for the same few
steps through Ray Train, scored on the same held-out images, one table row per kind, and
one MLflow run holding the table, the figures, the side-by-side reconstruction grid and
each kind's training run as a child; with --unified, a kind's whole workflow (corpus to
eval) nested under the bench's run and the unified model's columns filled from its eval.
(Its figures are for people: nothing here asserts on quality or speed, only that each
figure is there, in range, and the one its run logged.)"""

from __future__ import annotations

import json

import pytest
from PIL import Image
from smallkinds import SMALL
from trainshards import draws_and_edits
from workflowrun import BUDGETS

from uniloom.pipelines.config import CorpusConfig
from uniloom.pipelines.corpus.synth import synthesize
from uniloom.pipelines.tokenizer.bench import NOT_RUN, UNIFIED_COLUMNS

pytestmark = pytest.mark.integration

# 4x4 tokens per 32 px image: MingTok's latent_dim floats, UniTok's 4 int16 codes, TUNA's 4 floats
BYTES = {"mingtok": 16 * 8 * 4, "unitok": 16 * 4 * 2, "tuna": 16 * 4 * 4}


def test_bench_tokenizers_table_and_mlflow_run(ray_local, tmp_path, uniloom_main, report):
    import mlflow

    synthesize(CorpusConfig(num=24, shards=3, size=32), tmp_path / "corpus")
    sets = [f"{kind}.{k}={v}" for kind, sizes in SMALL.items() for k, v in sizes.items()] + [
        f"workspace={tmp_path / 'ws'}", "tokenizer.batch_size=4", "tokenizer.eval_interval=2",
        "tokenizer.eval_images=4", "tokenizer.checkpoint_interval=2", "tokenizer.probe_train=12",
        "tokenizer.probe_test=6",
    ]  # fmt: skip
    code, out, err = uniloom_main(
        "bench", "tokenizers", "--steps", "2", "--corpus", str(tmp_path / "corpus"), "--batch", "4",
        "--rounds", "1", "--grid", "4", "--threads", "1", *[a for s in sets for a in ("--set", s)], "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    rows, shared = summary["rows"], summary["shared"]
    assert sorted(rows) == sorted(SMALL) and shared["heldout_images"] == 8  # (--json sorts keys)
    assert shared["detector_on_originals_n"] == 8 and 0 <= shared["detector_on_originals"] <= 1
    for kind, row in rows.items():
        assert row["steps"] == 2 and not row["budget_cut"]
        assert 0 < row["psnr"] < 60 and row["psnr_lo"] <= row["psnr"] <= row["psnr_hi"]
        assert -1 <= row["ssim"] <= 1
        for name in ("detector_agreement", "probe_color", "probe_shape"):
            assert 0 <= row[f"{name}_lo"] <= row[name] <= row[f"{name}_hi"] <= 1
        assert row["detector_agreement_n"] == 8 and row["probe_color_n"] == 6
        assert row["tokens_per_image"] == 16 and row["bytes_per_image"] == BYTES[kind]
        assert (
            0 < row["encode_images_per_s_lo"] <= row["encode_images_per_s"] <= row["encode_images_per_s_hi"]
        )
        assert all(c not in row for c in UNIFIED_COLUMNS)
    rows_printed = [line for line in summary["table"].splitlines()[2:] if line.startswith("|")]
    assert [line.split(" | ")[0] for line in rows_printed] == [f"| {k}" for k in SMALL]
    assert all(line.endswith(f"| {NOT_RUN} | {NOT_RUN} | {NOT_RUN} |") for line in rows_printed)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    run_id = summary["mlflow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "reconstructions")
    }
    assert {"bench_tokenizers.md", "bench_tokenizers.json", "reconstructions/side_by_side.png"} <= artifacts
    grid = Image.open(client.download_artifacts(run_id, "reconstructions/side_by_side.png", str(tmp_path)))
    assert grid.size == (64 + 4 * 32, 4 * 32)  # label column + 4 images; originals + a row per kind
    assert client.get_run(run_id).data.metrics["unitok/bytes_per_image"] == BYTES["unitok"]
    children = client.search_runs(
        [client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"
    )
    assert {r.info.run_id for r in children} == {row["training_run_id"] for row in rows.values()}
    report("bench tokenizers (2 steps, 32 px):\n" + summary["table"])


def test_bench_tokenizers_unified_runs_the_kinds_workflow(ray_local, tmp_path, uniloom_main, report):
    import mlflow

    kind = "tuna"
    sets = [*BUDGETS, "corpus.size=32", *(f"{kind}.{k}={v}" for k, v in SMALL[kind].items()),
            f"workspace={tmp_path / 'ws'}"]  # fmt: skip
    code, out, err = uniloom_main(
        "bench", "tokenizers", "--unified", "--kind", kind, "--work", str(tmp_path / "work"), "--batch", "4",
        "--rounds", "1", "--grid", "4", "--threads", "1", *[a for s in sets for a in ("--set", s)], "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    row = summary["rows"][kind]
    assert summary["shared"]["unified"] and row["steps"] == 40 and row["unified_steps"] == 10
    for name in UNIFIED_COLUMNS:
        assert 0 <= row[f"{name}_lo"] <= row[name] <= row[f"{name}_hi"] <= 1 and row[f"{name}_n"] >= 4
    (line,) = [line for line in summary["table"].splitlines()[2:] if line.startswith(f"| {kind}")]
    assert "| 40 / 10 |" in line and NOT_RUN not in line

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")  # the bench's store
    bench = client.get_run(summary["mlflow_run_id"])
    (workflow,) = client.search_runs(
        [bench.info.experiment_id], f"tags.mlflow.parentRunId = '{bench.info.run_id}'"
    )
    assert workflow.info.run_id == row["workflow_run_id"]
    (evaluation,) = client.search_runs(
        [bench.info.experiment_id],
        f"tags.mlflow.parentRunId = '{workflow.info.run_id}' and tags.`uniloom.stage` = 'eval'",
    )
    for name in UNIFIED_COLUMNS:  # the row's figure is the one the workflow's eval logged
        assert evaluation.data.metrics[name] == pytest.approx(row[name])
        assert bench.data.metrics[f"{kind}/{name}"] == pytest.approx(row[name])
    assert not client.search_registered_models()  # the bench registers nothing
    manifest = json.loads((tmp_path / "work" / kind / "data" / "_manifest.json").read_text())
    assert manifest["image_tokenizer"]["kind"] == kind  # the kind's own shards
    report("bench tokenizers --unified (tuna, 32 px, workflow budgets of the tests):\n" + summary["table"])

    # the kind's unified model draws and edits through the commands (its registered twin:
    # tests/integration/test_workflow_kinds.py, UniTok)
    draws_and_edits(row["export"], tmp_path / "work" / kind, tmp_path)
