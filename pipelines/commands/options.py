"""Options every command shares: --preset, --config, --set, --json; and the summary."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

import click

from uniloom.pipelines.config import UniloomConfig, load_config, preset_names
from uniloom.pipelines.redact import redact, redact_text


def config_options(func):
    """Adds --preset/--config/--set and passes the loaded config as `cfg`."""

    @click.option(
        "--preset", default="tiny", show_default=True, help=f"Preset name ({', '.join(preset_names())})."
    )
    @click.option(
        "--config", "config_file", type=click.Path(dir_okay=False), help="YAML file merged over the preset."
    )
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override any field, e.g. corpus.num=100.",
    )
    @functools.wraps(func)
    def wrapper(*args, preset: str, config_file: str | None, overrides: tuple[str, ...], **kwargs):
        return func(*args, cfg=load_config(preset, config_file, overrides), **kwargs)

    return wrapper


json_option = click.option(
    "--json", "as_json", is_flag=True, help="End with one JSON summary line on stdout."
)


def progress(length: int, label: str):
    """A progress bar on stderr, so stdout stays clean for the JSON summary."""
    return click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True, show_eta=True)


def note(line: str) -> None:
    """A progress line on stderr, secrets redacted (stages echo URIs they were given)."""
    click.echo(redact_text(line), err=True)


def emit(summary: dict[str, Any], as_json: bool) -> None:
    """Print the summary, secrets redacted: a table for people, or one JSON object as
    the last line."""
    summary = redact(summary)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True, default=str))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        click.echo(f"{key:<{width}}  {value}")


def apply_cli_values(cfg: UniloomConfig, section: str, **values: Any) -> None:
    """Explicit command-line flags win over the preset (None means 'not given')."""
    target = getattr(cfg, section)
    for key, value in values.items():
        if value is not None:
            setattr(target, key, value)
