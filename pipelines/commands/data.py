"""`uniloom data`: pre-tokenize image-text corpora into Parquet shards, incrementally."""

from __future__ import annotations

import sys

import click

from uniloom.pipelines.commands.options import config_options, emit, json_option
from uniloom.pipelines.config import flatten
from uniloom.pipelines.errors import UniloomError


@click.group()
def data() -> None:
    """Read, filter and pre-tokenize corpora into Parquet shards (Ray Data)."""


def _log_run(summary: dict) -> None:
    import mlflow

    from uniloom.pipelines.redact import redact

    rows = summary["rows"]
    metrics = {
        "rows_read": rows["read"],
        "rows_written": rows["written"],
        "rows_quarantined": rows["quarantined"],
        "images_per_s": summary["images_per_s"],
        "seconds": summary["seconds"],
        "ray_startup_s": summary["ray_startup_s"],
        "output_rows": summary["output_rows"],
        **{f"filtered_{name}": n for name, n in rows["filtered"].items()},
        **{f"shards_{k}": v for k, v in summary["shards"].items()},
    }
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    mlflow.log_dict(redact(summary), "data_summary.json")


def _table(summary: dict) -> dict:
    """The summary as rows a person reads at the end of a run."""

    def join(d: dict) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d.items()) or "none"

    rows = summary["rows"]
    return {
        "output": summary["output"],
        "shards": join(summary["shards"]),
        "rows": join({k: rows[k] for k in ("read", "written", "quarantined")}),
        "filtered": join(rows["filtered"]),
        "output rows": summary["output_rows"],
        "seconds": f"{summary['seconds']} (Ray start-up {summary['ray_startup_s']})",
        "images/s": summary["images_per_s"],
        **({"errors": "; ".join(summary["errors"])} if summary["errors"] else {}),
    }


@data.command("run")
@click.option(
    "--input",
    "inputs",
    multiple=True,
    required=True,
    help="Input URL (path, s3://..., hf://NAME[:split] for a Hugging Face dataset); repeatable.",
)
@click.option("--output", required=True, help="Output URL: shards, manifest, tokenizer.")
@config_options
@json_option
def run_command(inputs: tuple[str, ...], output: str, cfg, as_json: bool) -> None:
    """Process the new and changed input shards; remove outputs of vanished ones."""
    from uniloom.pipelines.data.runner import preflight, run
    from uniloom.pipelines.tracking import RunLog, stage_run, tracking_uri

    # bad weights, inputs or a busy output fail before any run is recorded
    preflight(cfg, list(inputs), output)

    def committed(shard_id: str, rows: dict) -> None:
        dropped = sum(rows["filtered"].values())
        click.echo(
            f"committed {shard_id}: {rows['read']} read, {rows['written']} written, "
            f"{dropped} filtered, {rows['quarantined']} quarantined",
            err=True,
        )

    tracked = RunLog(tracking_uri(cfg))
    with stage_run(cfg, "data", tags={"uniloom.output": output}, log=tracked):
        summary = run(cfg, list(inputs), output, on_commit=committed)
        tracked("the run's metrics and summary", _log_run, summary)
    emit(summary if as_json else _table(summary), as_json)
    if lost := tracked.report():  # the output is complete: a warning, not a failure
        click.echo(f"warning: {lost}", err=True)
    if summary["errors"]:
        raise UniloomError(f"{len(summary['errors'])} input shard(s) failed: " + "; ".join(summary["errors"]))


def _given(ctx: click.Context) -> bool:
    """Whether the user chose a config on the command line."""
    names = ("preset", "config_file", "overrides")
    return any(ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT) for n in names)


@data.command("status")
@click.argument("output")
@click.option("--input", "inputs", multiple=True, help="Input URLs [default: those of the last run].")
@config_options
@json_option
def status_command(output: str, inputs: tuple[str, ...], cfg, as_json: bool) -> None:
    """Shards done, stale, missing and orphaned, and row counts, without changing anything.
    Staleness is judged against the config the last run recorded unless one is given."""
    from uniloom.pipelines.data.status import status

    summary = status(output, list(inputs), cfg, use_recorded=not _given(click.get_current_context()))
    if as_json:
        emit(summary, True)
        return
    emit({k: v for k, v in flatten(summary).items() if not k.startswith("details.")}, False)
    for sid, info in summary["details"].items():
        reason = f" ({info['reason']})" if info.get("reason") else ""
        click.echo(f"  {info['state']:<9} {sid}{reason}", file=sys.stdout)
