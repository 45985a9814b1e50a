"""`uniloom tokenizer`: train, evaluate and use the visual tokenizer (tokenizer.kind)."""

from __future__ import annotations

from pathlib import Path

import click

from uniloom.pipelines.commands.options import apply_cli_values, config_options, emit, json_option, note
from uniloom.pipelines.errors import UniloomError


@click.group()
def tokenizer() -> None:
    """The visual tokenizer: MingTok, UniTok or TUNA (--set tokenizer.kind=...)."""


@tokenizer.command()
@click.option("--corpus", type=click.Path(file_okay=False), help="Corpus tars [preset: <workspace>/corpus].")
@click.option("--steps", type=int, help="Training steps: the budget [preset: tokenizer.steps].")
@click.option(
    "--minutes", "max_minutes", type=float,
    help="Safety cap on training time; a run it cuts short says so [tokenizer.max_minutes; 0: none].",
)  # fmt: skip
@click.option("--workers", "num_workers", type=int, help="Ray Train workers [tokenizer.num_workers].")
@click.option("--run-name", help="Ray Train run name; an existing run is resumed [<kind>-<preset>].")
@click.option("--restart", is_flag=True, help="Discard the run's checkpoints and start afresh.")
@config_options
@json_option
def train(corpus, steps, max_minutes, num_workers, run_name, restart, cfg, as_json) -> None:
    """The tokenizer's training on Ray Train; exports and registers the weights."""
    from uniloom.pipelines.tokenizer.train import train_tokenizer

    apply_cli_values(
        cfg, "tokenizer", corpus=corpus, steps=steps, max_minutes=max_minutes, num_workers=num_workers,
        run_name=run_name,
    )  # fmt: skip
    emit(train_tokenizer(cfg, restart=restart, echo=note), as_json)


@tokenizer.command(name="eval")
@click.option("--weights", help="Tokenizer safetensors, a path or URL [the workspace's export].")
@click.option("--corpus", type=click.Path(file_okay=False), help="Corpus tars [preset: <workspace>/corpus].")
@click.option("--limit", type=int, help="Held-out images to score [tokenizer.eval_limit; 0: all].")
@config_options
@json_option
def evaluate(weights, corpus, limit, cfg, as_json) -> None:
    """PSNR, SSIM, detector agreement and linear-probe accuracy on held-out data."""
    from uniloom.pipelines.tokenizer.data import read_tars
    from uniloom.pipelines.tokenizer.evaluate import probe_accuracy, reconstruction_metrics
    from uniloom.pipelines.tokenizer.train import split_shards
    from uniloom.pipelines.tokenizer.weights import default_path, load_tokenizer
    from uniloom.pipelines.workspace import fetched

    apply_cli_values(cfg, "tokenizer", corpus=corpus, eval_limit=limit)
    path = weights or default_path(cfg)
    with fetched(cfg, path) as local:  # a URL (a remote workspace's export): copied here
        model = load_tokenizer(local)
    _, held = split_shards(cfg)
    samples = read_tars(held, model.cfg.image_size, limit=cfg.tokenizer.eval_limit or None)
    note(f"scoring reconstructions of {len(samples.keys)} held-out images from {len(held)} shard(s)")
    summary = {"weights": str(path), **reconstruction_metrics(model, samples)}
    t = cfg.tokenizer
    note(f"linear probes: {t.probe_train} fitting and {t.probe_test} test single-object scenes")
    summary.update(probe_accuracy(model, cfg.corpus.seed, t.probe_train, t.probe_test))
    emit({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}, as_json)


@tokenizer.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--weights", help="Tokenizer safetensors, a path or URL [the workspace's export].")
@config_options
@json_option
def reconstruct(images, out, weights, cfg, as_json) -> None:
    """Encode and decode IMAGE files; writes <out>/<name>.png and prints PSNR per image."""
    import numpy as np
    from PIL import Image

    from uniloom.pipelines.tokenizer.data import decode_image
    from uniloom.pipelines.tokenizer.evaluate import psnr, reconstruct_all
    from uniloom.pipelines.tokenizer.weights import default_path, load_tokenizer
    from uniloom.pipelines.workspace import fetched

    with fetched(cfg, weights or default_path(cfg)) as local:  # a URL: copied here
        model = load_tokenizer(local)
    decoded = []
    for name in images:  # every file is checked before any is written
        path = Path(name)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UniloomError(f"{path}: cannot read ({e.strerror or e})") from None
        decoded.append(decode_image(data, model.cfg.image_size, str(path)))
    batch = np.stack(decoded)
    recons = reconstruct_all(model, batch)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UniloomError(f"cannot create output directory {out}: {e.strerror}") from None
    written, scores = [], psnr(batch.transpose(0, 2, 3, 1), recons)
    for name, image in zip(images, recons):
        target = out / f"{Path(name).stem}.png"
        Image.fromarray(image).save(target)
        written.append(str(target))
    emit({"written": written, "psnr": [round(float(s), 2) for s in scores], "out": str(out)}, as_json)
