"""`uniloom submit`: run a uniloom command on a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import sys

import click

from uniloom.pipelines.commands.options import emit, json_option
from uniloom.pipelines.submit import submit as submit_job


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--address", required=True, help="Ray job server, e.g. http://HOST:8265.")
@click.option("--runtime-env", "runtime_env", type=click.Path(dir_okay=False), help="runtime_env YAML file.")
@click.option(
    "--token-path", type=click.Path(dir_okay=False), help="Ray auth token file (default: Ray's own lookup)."
)
@click.option(
    "--no-wait", is_flag=True, help="Return once the job is submitted; prints how to follow and stop it."
)
@json_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def submit(
    address: str, runtime_env: str | None, token_path: str | None, no_wait: bool, as_json: bool, command
) -> None:
    """Submit `uniloom COMMAND...` (after `--`) as a Ray Job; exits with the job's status
    (with --no-wait: non-zero only if the job already failed or was stopped)."""
    job_id, status = submit_job(address, list(command), runtime_env, token_path, wait=not no_wait)
    emit({"job_id": job_id, "status": status, "address": address}, as_json)
    if status not in ("SUCCEEDED", "PENDING", "RUNNING") or (not no_wait and status != "SUCCEEDED"):
        sys.exit(1)
