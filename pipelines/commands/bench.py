"""`uniloom bench`: throughput measurements, printed side by side from one run.

Speed claims live here, never in tests. Each subcommand measures on this machine and says
what it measured on (threads, device)."""

from __future__ import annotations

import time

import click

from uniloom.pipelines.commands.options import apply_cli_values, config_options, emit, json_option, note
from uniloom.pipelines.tokenizer.kinds import KINDS


@click.group()
def bench() -> None:
    """Measure throughput of the pieces of the system."""


def _rate(fn, images: int, iters: int, sync) -> float:
    fn()  # warm-up: allocations, kernel selection
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return images * iters / (time.perf_counter() - start)


def measure_mingtok(cfg, device: str, batch: int, iters: int) -> dict[str, float]:
    """Images/s of encode, semantic decode, pixel decode, full decode; and latents/s of
    incremental (KV-cached, one latent at a time) semantic decoding."""
    import torch

    from uniloom.models.mingtok import MingTok

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = MingTok(cfg).to(device=device, dtype=dtype).eval()
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype) * 2 - 1
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        latents = model.encode(images)
        features = model.decode_semantic(latents)

        def incremental():
            cache = model.new_semantic_cache(batch)
            for t in range(latents.shape[1]):
                model.decode_semantic(latents[:, t : t + 1], cache)

        out = {
            "encode_images_per_s": _rate(lambda: model.encode(images), batch, iters, sync),
            "semantic_decode_images_per_s": _rate(lambda: model.decode_semantic(latents), batch, iters, sync),
            "pixel_decode_images_per_s": _rate(lambda: model.decode_pixels(features), batch, iters, sync),
            "decode_images_per_s": _rate(
                lambda: model.decode_pixels(model.decode_semantic(latents)), batch, iters, sync
            ),
            "incremental_semantic_latents_per_s": _rate(incremental, batch * latents.shape[1], 1, sync),
        }
    return {k: round(v, 1) for k, v in out.items()}


@bench.command(name="tokenizer")
@click.option("--batch", default=16, show_default=True, help="Images per call.")
@click.option("--iters", default=5, show_default=True, help="Timed calls per measurement.")
@click.option("--threads", default=2, show_default=True, help="torch CPU threads.")
@config_options
@json_option
def tokenizer_bench(batch: int, iters: int, threads: int, cfg, as_json: bool) -> None:
    """MingTok encode/decode images/s: the chosen preset on CPU, and the paper preset at
    512 px on CUDA when a GPU is present."""
    import os

    import torch

    from uniloom.pipelines.config import load_config

    torch.set_num_threads(threads)
    m = cfg.mingtok
    click.echo(
        f"{cfg.preset} ({m.image_size} px, {m.num_tokens} latents) on CPU, {threads} threads", err=True
    )
    summary = {f"{cfg.preset}_cpu_{k}": v for k, v in measure_mingtok(m, "cpu", batch, iters).items()}
    summary.update(
        {"threads": threads, "cpu_count": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)}
    )
    if torch.cuda.is_available():
        paper = load_config("paper").mingtok
        click.echo(f"paper ({paper.image_size} px) on {torch.cuda.get_device_name()}, bf16", err=True)
        for k, v in measure_mingtok(paper, "cuda", batch, iters).items():
            summary[f"paper_cuda_{k}"] = v
    else:
        summary["paper_cuda"] = "skipped: no CUDA device on this machine"
    emit(summary, as_json)


SCALE_SIZES = (100, 1000, 10000)


@bench.command(name="data")
@click.option(
    "--images", default=20000, show_default=True, help="Synthetic images (>= 10000 amortises start-up)."
)
@click.option(
    "--shards",
    type=click.IntRange(min=1),
    multiple=True,
    help="Input shards; one of them is changed for a rerun [default: 20]. With --scale: the shard "
    f"counts to measure, repeatable [default: {', '.join(map(str, SCALE_SIZES))}].",
)
@click.option(
    "--scale",
    is_flag=True,
    help="Measure the manifest and planning path alone (no decode or encode) at each --shards count of "
    "small shards: no-op rerun seconds, seconds per shard, ms per commit.",
)
@click.option("--work", type=click.Path(file_okay=False), help="Working folder [default: a temporary one].")
@config_options
@json_option
def data_bench(
    images: int, shards: tuple[int, ...], scale: bool, work: str | None, cfg, as_json: bool
) -> None:
    """Data stage: pipeline vs single-process ceiling images/s, unchanged and one-shard
    reruns vs the full run, and the peak memory of the whole process tree. With --scale:
    how no-op rerun and commit times grow with the number of shards."""
    import tempfile
    from pathlib import Path

    from uniloom.pipelines.data.bench import bench_data, bench_scale, scale_table

    def echo(line: str) -> None:
        click.echo(line, err=True)

    if not scale and len(shards) > 1:
        raise click.UsageError("--shards is given once, except with --scale")
    with tempfile.TemporaryDirectory(prefix="uniloom-bench-data-") as tmp:
        if scale:
            summary = bench_scale(cfg, Path(work or tmp), list(shards or SCALE_SIZES), echo)
            if not as_json:
                click.echo(scale_table(summary))
                return
        else:
            summary = bench_data(cfg, Path(work or tmp), images, shards[0] if shards else 20, echo)
    emit(summary, as_json)


@bench.command(name="train")
@click.option("--workers", type=int, help="Ray Train workers [config: train.workers].")
@click.option("--steps", default=10, show_default=True, help="Optimizer steps per timed window.")
@click.option("--rounds", default=3, show_default=True, help="Timed windows of each side, alternating.")
@click.option(
    "--images",
    default=4096,
    show_default=True,
    help="Rendered scenes the data stage tokenizes for the bench (a small set restarts its epoch every few steps).",
)
@click.option("--work", type=click.Path(file_okay=False), help="Working folder [default: a temporary one].")
@click.option(
    "--profile",
    is_flag=True,
    help="After the timed windows, one more plain-loop window under torch.profiler: the top ops or kernels, "
    "the matmul and attention shares of the time, on CUDA how busy the GPU was and the kernels per step.",
)
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="Also time the plain loop with train.compile on, in windows alternating with the others: "
    "compile_speedup (leave train.compile off to compare with eager).",
)
@config_options
@json_option
def train_bench(
    workers, steps: int, rounds: int, images: int, work, profile: bool, compile_: bool, cfg, as_json: bool
) -> None:
    """Training: tokens/s per worker of Ray Train + DeepSpeed (expert parallel, ZeRO)
    over tokens/s of a plain PyTorch loop, same model, batches and threads, measured in
    alternating windows inside one run."""
    from pathlib import Path

    from uniloom.pipelines.train.bench import bench_train
    from uniloom.pipelines.train.trainer import ray_output_on_stderr

    with ray_output_on_stderr():
        summary = bench_train(cfg, workers or cfg.train.workers, steps, rounds, images, Path(work) if work else None,
                              echo=lambda line: click.echo(line, err=True), profile=profile, compile=compile_)  # fmt: skip
    emit(summary, as_json)


@bench.command(name="kernels")
@click.option("--quick", is_flag=True, help="Small shapes: shows the command works, measures little.")
@click.option("--steps", default=5, show_default=True, help="Training steps per timed window.")
@click.option("--rounds", default=5, show_default=True, help="Timed windows of each side, alternating.")
@click.option("--threads", default=1, show_default=True, help="torch CPU threads (a training worker's).")
@config_options
@json_option
def kernels_bench(quick: bool, steps: int, rounds: int, threads: int, cfg, as_json: bool) -> None:
    """Each fused op (kernels/) against its PyTorch reference and eager PyTorch: time,
    and the linear cross-entropy's peak memory at a 126,464-token vocabulary; then one
    training step of the preset with the chunked cross-entropy against eager. On CUDA
    when a GPU is present (Triton timed there), else on the CPU (references only)."""
    import torch

    from uniloom.pipelines.kernel_bench import bench_kernels

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = bench_kernels(cfg, device, quick, lambda line: click.echo(line, err=True), steps, rounds)
    emit(summary, as_json)


@bench.command(name="tokenizers")
@click.option("--steps", type=int, help="Training steps of every kind: the equal budget [tokenizer.steps].")
@click.option(
    "--kind", "kinds", type=click.Choice(list(KINDS)), multiple=True,
    help="A kind to compare, repeatable [default: all].",
)  # fmt: skip
@click.option("--corpus", type=click.Path(file_okay=False), help="Corpus tars [preset: <workspace>/corpus].")
@click.option("--limit", default=0, show_default=True, help="Held-out images to score; 0: all.")
@click.option("--grid", default=8, show_default=True, help="Held-out images in the side-by-side grid.")
@click.option("--batch", default=32, show_default=True, help="Images per timed encode call.")
@click.option("--rounds", default=3, show_default=True, help="Timed encode rounds, the kinds alternating.")
@click.option("--threads", default=2, show_default=True, help="torch CPU threads of the scoring.")
@click.option(
    "--unified", is_flag=True,
    help="Run each kind's workflow (corpus to eval, the preset's recipe) and add the unified "
    "model's GenEval, VQA and 2-round edit columns.",
)  # fmt: skip
@click.option(
    "--work", type=click.Path(file_okay=False), help="Runs and exports [default: a temporary folder]."
)
@config_options
@json_option
def tokenizers_bench(
    steps, kinds, corpus, limit, grid, batch, rounds, threads, unified, work, cfg, as_json
) -> None:
    """MingTok, UniTok and TUNA trained on the same step budget and corpus, each by
    `uniloom tokenizer train`'s path, then one table: reconstruction PSNR/SSIM, detector
    agreement, linear probes (with 95% intervals), tokens and bytes per image in the shards,
    encode images/s; logged to MLflow with the reconstructions side by side. With
    --unified each kind runs the workflow's stages (corpus to eval) on equal budgets and the
    table adds the unified model's GenEval, VQA and 2-round edit success."""
    import tempfile
    from pathlib import Path

    import torch

    from uniloom.pipelines.config import load_config
    from uniloom.pipelines.tokenizer.bench import bench_tokenizers

    if unified and corpus:
        raise click.UsageError(
            "--unified runs each kind's workflow on the corpus it synthesises (corpus.*): drop --corpus"
        )
    params = click.get_current_context().params  # each kind's config: the same sources + its kind
    configs = {
        k: load_config(params["preset"], params["config_file"], [*params["overrides"], f"tokenizer.kind={k}"])
        for k in kinds or KINDS
    }
    for c in (cfg, *configs.values()):
        apply_cli_values(c, "tokenizer", corpus=corpus)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="uniloom-bench-tokenizers-") as tmp:
        summary = bench_tokenizers(
            cfg, configs, steps, Path(work or tmp), note, limit=limit, rounds=rounds, batch=batch, grid=grid,
            unified=unified,
        )  # fmt: skip
    if as_json:
        emit(summary, as_json)
    else:
        click.echo(summary["table"])
        emit(summary["shared"] | {"mlflow_run_id": summary["mlflow_run_id"]}, False)
