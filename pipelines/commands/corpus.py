"""`uniloom corpus`: write the embedded compositional corpus and the real-photo split."""

from __future__ import annotations

import time
from pathlib import Path

import click

from uniloom.pipelines.commands.options import apply_cli_values, config_options, emit, json_option, progress
from uniloom.pipelines.corpus.synth import prepare, synthesize, write_photos


@click.group()
def corpus() -> None:
    """Generate the embedded corpus (webdataset tars)."""


@corpus.command()
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory."
)
@click.option("--num", type=int, help="Number of samples [preset: corpus.num].")
@click.option("--shards", type=int, help="Number of tar shards [preset: corpus.shards].")
@click.option("--size", type=int, help="Image side in pixels [preset: corpus.size].")
@click.option("--seed", type=int, help="Random seed [preset: corpus.seed].")
@config_options
@json_option
def synth(out: Path, num, shards, size, seed, cfg, as_json: bool) -> None:
    """Render compositional shape scenes with captions, VQA pairs and edit targets."""
    apply_cli_values(cfg, "corpus", num=num, shards=shards, size=size, seed=seed)
    c = cfg.corpus
    prepare(c, out)
    start = time.perf_counter()
    with progress(max(c.num, 1), "synthesising") as bar:
        paths = synthesize(c, out, progress=bar.update)
    seconds = time.perf_counter() - start
    emit(
        {
            "out": str(out),
            "samples": c.num,
            "shards": len(paths),
            "size": c.size,
            "seed": c.seed,
            "seconds": round(seconds, 2),
            "samples_per_s": round(c.num / seconds, 1),
        },
        as_json,
    )


@corpus.command()
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory."
)
@json_option
def photos(out: Path, as_json: bool) -> None:
    """Write the real-photo split (scikit-image sample photographs, hand captioned)."""
    path = write_photos(out)
    emit({"out": str(path)}, as_json)
