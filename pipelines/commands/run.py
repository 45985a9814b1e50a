"""`uniloom run`: the whole workflow on one preset, skipping unchanged stages."""

from __future__ import annotations

import time

import click

from uniloom.pipelines.commands.options import config_options, emit, json_option
from uniloom.pipelines.tracking import tracking_uri
from uniloom.pipelines.workspace import scratch, workspace_uri


@click.command()
@click.option(
    "--workspace",
    type=click.Path(file_okay=False),
    help="Workspace: a local folder or a URL, e.g. s3://bucket/prefix [config: workspace].",
)
@click.option("--force", multiple=True, metavar="STAGE", help="Rerun STAGE even if unchanged (repeatable).")
@click.option(
    "--verbose",
    is_flag=True,
    help="Show every stage's own output too, not only its progress (it is in the logs folder either way).",
)
@config_options
@json_option
def run(workspace: str | None, force: tuple[str, ...], verbose: bool, cfg, as_json: bool) -> None:
    """Corpus -> tokenizer -> data -> training recipe -> evaluation -> registry.

    Each stage shows one progress bar; its full output goes to <logs>/<stage>.log: <workspace>/logs, or
    for a workspace on object storage a folder of this machine's temp folder (the summary names it)."""
    from uniloom.pipelines.errors import UniloomError
    from uniloom.pipelines.terminal import Terminal
    from uniloom.pipelines.workflow import run_workflow
    from uniloom.pipelines.workflow_stages import workflow_stages

    if workspace:
        cfg.workspace = workspace
    stages = workflow_stages()
    unknown = set(force) - {s.name for s in stages}
    if unknown:
        raise UniloomError(f"--force: unknown stage(s) {', '.join(sorted(unknown))}")
    start = time.perf_counter()
    logs = scratch(cfg, "logs")
    reports, parent_run = run_workflow(cfg, stages, force=force, terminal=Terminal(logs, verbose))
    seconds = time.perf_counter() - start
    click.echo("", err=True)
    click.echo(f"{'stage':<12} {'status':<8} {'seconds':>8}  metrics", err=True)
    for r in reports:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.result.metrics.items()))
        click.echo(f"{r.name:<12} {r.status:<8} {r.seconds:>8.1f}  {metrics}", err=True)
    emit(summarize(cfg, reports, parent_run, seconds), as_json)


def summarize(cfg, reports, parent_run: str | None, seconds: float) -> dict:
    """The run's summary (emit redacts the tracking URI's credentials when printing)."""
    return {
        "workspace": workspace_uri(cfg),
        "mlflow_tracking_uri": tracking_uri(cfg),
        "mlflow_parent_run": parent_run,
        "logs": str(scratch(cfg, "logs")),
        "seconds": round(seconds, 1),
        "ran": [r.name for r in reports if r.status == "ran"],
        "skipped": [r.name for r in reports if r.status == "skipped"],
        "metrics": {f"{r.name}.{k}": v for r in reports for k, v in r.result.metrics.items()},
        "outputs": {f"{r.name}.{k}": v for r in reports for k, v in r.result.outputs.items()},
    }
