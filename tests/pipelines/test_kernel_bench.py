"""`uniloom bench kernels` end to end on the CPU: every op's figures and the training-step
comparison come back, and the two sides of that comparison compute the same loss (they
differ only in how the text cross-entropy is computed, not in what)."""

import json

import pytest
from click.testing import CliRunner

from uniloom.pipelines.cli import cli
from uniloom.pipelines.config import load_config
from uniloom.pipelines.kernel_bench import OPS, batch_for, train_step_comparison


def test_batch_fills_the_preset_rows_with_every_kind_of_target():
    cfg = load_config("tiny")
    batch, features = batch_for(cfg)
    assert batch.input_ids.shape == (cfg.train.micro_batch, cfg.train.seq_len)
    assert features.shape == (int(batch.image_mask.sum()), cfg.model.semantic_dim)
    assert batch.image_targets.any() and (batch.text_targets >= 0).any()


def test_train_step_sides_agree_on_the_loss():
    cfg = load_config("tiny", overrides=["train.precision=fp32"])
    figures = train_step_comparison(cfg, "cpu", steps=1, rounds=1)
    assert figures["train_step_loss_diff"] == pytest.approx(0.0, abs=1e-4)
    assert figures["train_step_chunked_ms"] > 0 and figures["train_step_eager_ms"] > 0
    assert figures["train_step_time_ratio"] == pytest.approx(
        figures["train_step_chunked_ms"] / figures["train_step_eager_ms"], rel=0.01
    )


def test_bench_kernels_cli_reports_every_op():
    result = CliRunner().invoke(
        cli,
        ["bench", "kernels", "--quick", "--steps", "1", "--rounds", "1", "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["device"] == "cpu"
    for op in OPS:
        assert any(key.startswith(op) for key in summary), op
    assert summary["linear_ce_reference_peak_ratio"] < 1.0  # chunking never needs the whole logits
