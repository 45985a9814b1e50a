"""`uniloom train`: the unified model on Ray Train + DeepSpeed, stage by stage."""

from __future__ import annotations

import click

from uniloom.pipelines.commands.options import config_options, emit, json_option, note
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train.trainer import ray_output_on_stderr


@click.command()
@click.option(
    "--stage", type=int, help="Run only stage N of the recipe (1-based), from stage N-1's checkpoint."
)
@click.option("--recipe", "whole", is_flag=True, help="Run every stage in order (the default).")
@click.option("--workers", type=int, help="Ray Train workers [config: train.workers].")
@config_options
@json_option
def train(stage: int | None, whole: bool, workers: int | None, cfg, as_json: bool) -> None:
    """Train the unified MoE model on the data stage's shards. Rerunning the same run
    (train.run_name, train.storage) resumes it from its latest checkpoint."""
    from uniloom.pipelines.train.trainer import train as run

    if stage is not None and whole:
        raise UniloomError("--stage and --recipe exclude each other")
    if workers is not None and workers < 1:
        raise UniloomError("--workers must be at least 1")
    with ray_output_on_stderr():
        summary = run(cfg, stage=stage, workers=workers, echo=note)
    if not as_json:
        summary = {k: v for k, v in summary.items() if k != "loss_curve"}
    emit(summary, as_json)
