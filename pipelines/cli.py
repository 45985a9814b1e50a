"""The `uniloom` command line. Subcommands live in pipelines/commands/, one file each.

Every error a user can fix (bad arguments, bad config, bad input) is one line on stderr,
secrets redacted, and a non-zero exit; tracebacks are for bugs.
"""

from __future__ import annotations

import os
import sys

import click

from uniloom.pipelines.commands.bench import bench
from uniloom.pipelines.commands.corpus import corpus
from uniloom.pipelines.commands.data import data
from uniloom.pipelines.commands.evaluate import edit, evaluate, generate
from uniloom.pipelines.commands.model import model
from uniloom.pipelines.commands.run import run
from uniloom.pipelines.commands.submit import submit
from uniloom.pipelines.commands.tokenizer import tokenizer
from uniloom.pipelines.commands.train import train
from uniloom.pipelines.commands.ui import ui
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.redact import redact_text


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="uniloom")
def cli() -> None:
    """uniloom: train unified vision-language models on continuous visual tokens."""


cli.add_command(corpus)
cli.add_command(data)
cli.add_command(run)
cli.add_command(evaluate)
cli.add_command(generate)
cli.add_command(model)
cli.add_command(edit)
cli.add_command(submit)
cli.add_command(tokenizer)
cli.add_command(bench)
cli.add_command(train)
cli.add_command(ui)


def main() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        ctx = getattr(e, "ctx", None)
        where = f" ({ctx.command_path})" if ctx is not None else ""
        click.echo(f"error{where}: {redact_text(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except UniloomError as e:
        click.echo(f"error: {redact_text(str(e))}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
