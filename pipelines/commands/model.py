"""`uniloom model info`: what a preset's models are made of, counted on the meta device."""

from __future__ import annotations

import click

from uniloom.pipelines.commands.options import config_options, emit, json_option


@click.group()
def model() -> None:
    """The unified model and its image tokenizer."""


@model.command()
@config_options
@json_option
def info(cfg, as_json: bool) -> None:
    """Parameter counts of the preset's models (total, active per token, per part) and the
    training FLOPs per unit of a batch that `uniloom bench train` counts for MFU. Built on
    the meta device: nothing is allocated, so the paper preset counts in seconds anywhere."""
    from uniloom.pipelines.model_info import parameter_counts
    from uniloom.pipelines.train.flops import TrainingFlops

    summary = parameter_counts(cfg)
    flops = TrainingFlops.of(cfg)
    summary.update(
        {
            f"flops.per_tok (seq_len {cfg.train.seq_len})": flops.per_token,
            "flops.per_text_target": flops.per_text_target,
            "flops.per_image_slot": flops.per_image_slot,
            "flops.per_image_target": flops.per_image_target,
        }
    )
    if not as_json:  # people read billions; JSON keeps the exact integers
        summary = {k: f"{v:>17,.0f}  ({v / 1e9:.3f}B)" if isinstance(v, (int, float)) else v
                   for k, v in summary.items()}  # fmt: skip
    emit(summary, as_json)
