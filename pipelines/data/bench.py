"""`uniloom bench data`: the data stage measured against its own ceiling, in one run.

ceiling    the same decode, resize, edit-target decode, MingTok encode and Parquet write, in a
           tight single-process loop over the same shards, torch threads = the total
           the pipeline's actors use (actors x threads per actor)
full run   the pipeline over all shards (Ray and Ray Data's per-cluster service actors
           already started: their start-up, like the BPE training, is reported separately)
reruns     nothing changed; then 1 of the shards changed
memory     peak proportional set size (PSS) of this process and every process under it
           (Ray's GCS, raylet, workers, actors) during the full run

`bench_scale` (`uniloom bench data --scale`) measures the manifest and planning path alone
at many small shards: per-commit time and no-op rerun time as the shard count grows.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from uniloom.pipelines.config import CorpusConfig, UniloomConfig
from uniloom.pipelines.corpus.synth import synth_sample, synthesize, write_tar
from uniloom.pipelines.data import text_tokenizer
from uniloom.pipelines.data.commit import write_parquet
from uniloom.pipelines.data.discovery import discover
from uniloom.pipelines.data.fs import open_fs
from uniloom.pipelines.data.image_tokenizer import Encoder, resolve_weights, save_random_weights
from uniloom.pipelines.data.images import EditTargets, Load, Open, ParseMeta, ResizeCrop
from uniloom.pipelines.data.manifest import code_version
from uniloom.pipelines.data.readers import InputShard, read_shard
from uniloom.pipelines.data.runner import run
from uniloom.pipelines.data.schema import fixed_binary, fixed_binary_lists
from uniloom.pipelines.data.stages import OK, Batch
from uniloom.pipelines.errors import UniloomError


class PeakMemory:
    """Samples the PSS of this process tree every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self.samples = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _total(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ceiling(cfg: UniloomConfig, shards: list[InputShard], out: Path) -> tuple[int, float]:
    """The same per-row work as the pipeline, none of its machinery, in this process:
    (images, seconds)."""
    import torch

    d, e = cfg.data, cfg.data.exec
    threads = e.encode_actors * e.torch_threads
    torch.set_num_threads(threads)
    S = cfg.mingtok.image_size
    stages = [ParseMeta(), Open(d.max_pixels), Load(), ResizeCrop(S), EditTargets(S, d.max_pixels)]
    encoder = Encoder(
        asdict(cfg.mingtok), d.tokenizer_weights, d.storage_options, asdict(e), d.latent_dtype, d.precision
    )
    torch.set_num_threads(threads)  # the Encoder sets its per-actor count
    fs, root = open_fs(str(out))
    fs.makedirs(f"{root}/_tmp", exist_ok=True)
    images, start = 0, time.perf_counter()
    for shard in shards:
        tables = []
        for block in read_shard(shard, d):
            batch = Batch(block)
            for stage in stages:
                stage(batch)
            live = batch.status == OK
            latents = np.zeros((batch.n, cfg.mingtok.num_tokens, cfg.mingtok.latent_dim), encoder.dtype)
            latents[live] = encoder.encode(batch.values["pixels"][live])
            chains = batch.values.get("edit_pixels", [None] * batch.n)
            chains = [c if ok else None for c, ok in zip(chains, live)]
            item = pa.binary(latents.itemsize * cfg.mingtok.num_tokens * cfg.mingtok.latent_dim)
            edit_latents = fixed_binary_lists(encoder.encode_chains(chains), item)
            columns = [block.column("key"), fixed_binary(latents, live), edit_latents]
            tables.append(pa.table(columns, names=["key", "latents", "edit_latents"]).filter(pa.array(live)))
            images += int(live.sum())
        write_parquet(fs, root, pa.concat_tables(tables), f"{root}/{shard.id}.parquet")
    return images, time.perf_counter() - start


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "shards").iterdir())}


def _timed_run(cfg, corpus: str, out: Path) -> tuple[dict, float, set[str]]:
    before = _mtimes(out) if (out / "shards").exists() else {}
    start = time.perf_counter()
    summary = run(cfg, [corpus], str(out))
    seconds = time.perf_counter() - start
    after = _mtimes(out)
    return summary, seconds, {k for k, v in after.items() if before.get(k) != v}


def _check_code(before: str) -> None:
    """In a shared checkout someone may edit the stage's code mid-bench: every shard is
    then legitimately stale and the reruns measure nothing, so say so and stop."""
    if code_version() != before:
        raise UniloomError("the data stage's source files changed during the bench; rerun it")


def _change_shard(cfg: UniloomConfig, corpus: Path, shard: int, shards: int, images: int) -> str:
    """Re-render one shard's scenes from another seed: same size, different content."""
    bounds = np.linspace(0, images, shards + 1).astype(int)
    other = CorpusConfig(num=images, shards=shards, size=cfg.mingtok.image_size, seed=cfg.corpus.seed + 1)
    path = corpus / f"shapes-{shard:05d}.tar"
    write_tar(path, (synth_sample(other, i) for i in range(bounds[shard], bounds[shard + 1])))
    return path.name


def start_ray_data_services() -> None:
    """Ray Data starts its per-cluster service actors (stats, autoscaling coordinator,
    actor locations; all detached) on a cluster's first dataset, then keeps them: start
    them with Ray, so the full run is measured as on a running cluster."""
    import ray

    ray.data.range(2, override_num_blocks=2).map_batches(lambda batch: batch).materialize()


def bench_data(cfg: UniloomConfig, work: Path, images: int, shards: int, echo) -> dict[str, Any]:
    from uniloom.pipelines.raycluster import init_ray

    load = [round(x, 2) for x in os.getloadavg()]
    corpus, out = work / "corpus", work / "out"
    work.mkdir(parents=True, exist_ok=True)
    if not cfg.data.tokenizer_weights:
        cfg.data.tokenizer_weights = save_random_weights(cfg.mingtok, str(work / "mingtok.safetensors"))
    uri, _, arch = resolve_weights(cfg)  # the ceiling encodes with the weights' own architecture
    cfg = dataclasses.replace(cfg, mingtok=arch, data=dataclasses.replace(cfg.data, tokenizer_weights=uri))
    start = time.perf_counter()
    corpus_cfg = CorpusConfig(num=images, shards=shards, size=arch.image_size, seed=cfg.corpus.seed)
    synthesize(corpus_cfg, corpus)
    setup_s = time.perf_counter() - start

    echo(f"corpus: {images} images in {shards} shards ({setup_s:.1f} s); training the BPE")
    start = time.perf_counter()
    tok = text_tokenizer.train_bpe(
        text_tokenizer.training_texts(discover([str(corpus)], cfg.data), cfg.data),
        cfg.data.bpe_vocab_size,
        cfg.data.bpe_min_frequency,
    )
    cfg.data.text_tokenizer = text_tokenizer.save_beside(tok, str(work), {}).uri
    bpe_s = time.perf_counter() - start
    start = time.perf_counter()
    init_ray(cfg.ray)
    ray_s = time.perf_counter() - start
    start = time.perf_counter()
    start_ray_data_services()
    services_s = time.perf_counter() - start

    # The ceiling runs on half the shards before the pipeline and half after, so a change
    # in the machine's load during the bench weighs on both sides alike.
    inputs = discover([str(corpus)], cfg.data)
    echo("ceiling, first half: single-process loop")
    images_a, seconds_a = ceiling(cfg, inputs[0::2], work / "ceiling")
    echo(f"ceiling: {images_a / seconds_a:.1f} images/s; full pipeline run")
    code = code_version()
    with PeakMemory() as memory:
        full, full_s, _ = _timed_run(cfg, str(corpus), out)
    echo(f"full run: {full_s:.1f} s; ceiling, second half")
    images_b, seconds_b = ceiling(cfg, inputs[1::2], work / "ceiling")
    top = {"images_per_s": round((images_a + images_b) / (seconds_a + seconds_b), 1)}
    top["torch_threads"] = cfg.data.exec.encode_actors * cfg.data.exec.torch_threads
    echo("rerun with nothing changed")
    _check_code(code)
    same, same_s, same_rewritten = _timed_run(cfg, str(corpus), out)
    changed = _change_shard(cfg, corpus, shards // 3, shards, images)
    echo(f"rerun with {changed} changed")
    one, one_s, one_rewritten = _timed_run(cfg, str(corpus), out)
    _check_code(code)
    pipeline_ips = full["rows"]["read"] / full_s
    return {
        "images": images,
        "shards": shards,
        "preset": cfg.preset,
        "cpu_count": os.cpu_count(),
        "load_avg_before": load,
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "startup_s": {
            "ray_init": round(ray_s, 2),
            "ray_data_services": round(services_s, 2),
            "bpe_train": round(bpe_s, 2),
            "corpus_synth": round(setup_s, 2),
        },
        "ceiling_images_per_s": top["images_per_s"],
        "ceiling_torch_threads": top["torch_threads"],
        "ceiling_halves_images_per_s": [round(images_a / seconds_a, 1), round(images_b / seconds_b, 1)],
        "pipeline_images_per_s": round(pipeline_ips, 1),
        "pipeline_actors_x_threads": f"{cfg.data.exec.encode_actors}x{cfg.data.exec.torch_threads}",
        "efficiency": round(pipeline_ips / top["images_per_s"], 3),
        "full_run_s": round(full_s, 2),
        "full_run_rows": full["rows"],
        "unchanged_rerun_s": round(same_s, 3),
        "unchanged_rerun_ratio": round(same_s / full_s, 4),
        "unchanged_rerun_rewrote": sorted(same_rewritten),
        "changed_shard": changed,
        "one_changed_rerun_s": round(one_s, 2),
        "one_changed_rerun_ratio": round(one_s / full_s, 4),
        "one_changed_rerun_rewrote": sorted(one_rewritten),
        "peak_memory_gib": round(memory.peak / 2**30, 3),
        "memory_samples": memory.samples,
        "pass": {
            "efficiency>=0.8": pipeline_ips / top["images_per_s"] >= 0.8,
            "unchanged<=5%": same_s <= 0.05 * full_s and not same_rewritten,
            "one_changed<=15%": one_s <= 0.15 * full_s
            and {n.rsplit(".", 2)[0] for n in one_rewritten} == {changed},
            "peak_memory<=4GiB": memory.peak <= 4 * 2**30 if images >= 20000 else "needs --images 20000",
        },
    }


# ---------------------------------------------------------------- scale: the manifest path

SCALE_MINGTOK = dict(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip
SCALE_ROWS = 3  # rows per synthetic shard


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _scale_corpus(corpus: Path, n: int) -> None:
    png = _tiny_png()
    corpus.mkdir(parents=True)
    for i in range(n):
        rows = [
            (f"{i:06d}-{j}", {"png": png, "txt": f"shard {i} row {j}".encode()}) for j in range(SCALE_ROWS)
        ]
        write_tar(corpus / f"s-{i:06d}.tar", rows)


def _bench_commit(manifest, lock, shard: InputShard, input_hash: str, stage) -> float:
    """What Committer.commit does around a shard's rows: write its four small tables under
    content-addressed names, check the lease, put the manifest record. Returns seconds."""
    from uniloom.pipelines.data.commit import TABLES, write_named
    from uniloom.pipelines.data.dedup import index_table
    from uniloom.pipelines.data.manifest import input_meta, shard_fingerprint
    from uniloom.pipelines.data.schema import REJECTED_SCHEMA

    start = time.perf_counter()
    keys = [f"{shard.id}-{j}" for j in range(SCALE_ROWS)]
    tables = {
        "quarantine": REJECTED_SCHEMA.empty_table(),
        "filtered": REJECTED_SCHEMA.empty_table(),
        "index": index_table(keys, [os.urandom(16) for _ in keys], np.arange(len(keys), dtype=np.uint64)),
        "output": pa.table({"key": keys, "source": [shard.uri] * len(keys)}),
    }
    fs, root = manifest.fs, manifest.root
    files = {kind: write_named(fs, root, TABLES[kind], shard.id, t) for kind, t in tables.items()}
    lock.check()
    rows = {"read": SCALE_ROWS, "written": SCALE_ROWS, "filtered": {}, "quarantined": 0}
    manifest.put(
        shard.id,
        {
            "source": shard.uri,
            "format": shard.format,
            "input_hash": input_hash,
            "input_meta": input_meta(shard),
            "stage": dataclasses.asdict(stage),
            "fingerprint": shard_fingerprint(input_hash, stage),
            "output": files["output"],
            "files": files,
            "rows": rows,
            "dedup_against": [],
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return time.perf_counter() - start


def _bench_warm_up(folder: Path) -> None:
    """One untimed Parquet write: the first pays for imports and codec set-up."""
    from uniloom.pipelines.data.commit import write_named

    fs, root = open_fs(str(folder))
    for sub in ("_tmp", "t"):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    write_named(fs, root, "t", "warm-up", pa.table({"key": ["a"]}))


def bench_scale(cfg: UniloomConfig, work: Path, sizes: list[int], echo) -> dict[str, Any]:
    """The manifest and planning path at N input shards of a few rows each, for each N:
    the first plan (lists and hashes every input), N commits of the committer's files and
    manifest records (rows are not decoded or encoded: per shard that cost does not grow
    with N), the end-of-run compaction, and the no-op rerun (`uniloom data run` with
    nothing changed: lease, listing, manifest, plan, sweep, snapshot; no Ray). The goal
    is a flat per-shard cost: commit ms the same at every N, no-op seconds per shard too."""
    from uniloom.models.mingtok_config import MingTokConfig
    from uniloom.pipelines.data.commit import TABLES
    from uniloom.pipelines.data.lock import OutputLock
    from uniloom.pipelines.data.runner import prepare_run

    work.mkdir(parents=True, exist_ok=True)
    mingtok = MingTokConfig(**SCALE_MINGTOK)
    cfg = dataclasses.replace(cfg, mingtok=mingtok, data=dataclasses.replace(cfg.data))
    cfg.data.tokenizer_weights = save_random_weights(mingtok, str(work / "mingtok.safetensors"))
    captions = [f"shard {i} row {j}" for i in range(100) for j in range(SCALE_ROWS)]
    tok = text_tokenizer.train_bpe(captions, 300, cfg.data.bpe_min_frequency)
    cfg.data.text_tokenizer = text_tokenizer.save_beside(tok, str(work), {}).uri
    _bench_warm_up(work / "warm-up")
    rows = []
    for n in sizes:
        corpus, out = work / f"corpus-{n}", work / f"out-{n}"
        for folder in (corpus, out):  # the bench's own, from an earlier bench in this --work
            shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        _scale_corpus(corpus, n)
        echo(f"N={n}: corpus written ({time.perf_counter() - start:.1f} s); first plan and {n} commits")
        start = time.perf_counter()
        state = prepare_run(cfg, [str(corpus)], str(out))
        first_plan_s = time.perf_counter() - start
        manifest, p = state["manifest"], state["plan"]
        with OutputLock(str(out), cfg.data.storage_options) as lock:
            manifest.save()
            for folder in ("_tmp", *TABLES.values()):  # as the Committer makes them
                manifest.fs.makedirs(f"{manifest.root}/{folder}", exist_ok=True)
            commits = [
                _bench_commit(manifest, lock, s, state["hashes"][s.id], state["stage"]) for s in p.todo
            ]
            start = time.perf_counter()
            manifest.save()
            compact_s = time.perf_counter() - start
        echo(f"N={n}: no-op reruns")
        noop = []
        for _ in range(2):  # the best of two: the first may pay for a cold file-system cache
            start = time.perf_counter()
            summary = run(cfg, [str(corpus)], str(out))
            noop.append(time.perf_counter() - start)
            if summary["shards"]["up_to_date"] != n or summary["shards"]["processed"]:
                raise UniloomError(f"the no-op rerun at N={n} was not one: {summary['shards']}")
        tenth = max(n // 10, 1)
        rows.append(
            {
                "shards": n,
                "noop_rerun_s": round(min(noop), 3),
                "noop_s_per_shard": min(noop) / n,
                "commit_ms": round(1000 * sum(commits) / n, 3),
                "commit_ms_first_10pct": round(1000 * sum(commits[:tenth]) / tenth, 3),
                "commit_ms_last_10pct": round(1000 * sum(commits[-tenth:]) / tenth, 3),
                "compact_s": round(compact_s, 3),
                "first_plan_s": round(first_plan_s, 3),
            }
        )
    return {"measures": "manifest and planning path (no decode or encode)", "rows_per_shard": SCALE_ROWS,
            "cpu_count": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()], "sizes": rows}  # fmt: skip


def scale_table(result: dict[str, Any]) -> str:
    """The figures as a table: N, no-op rerun s, s per shard, commit ms (all, first and
    last tenth of the commits), compaction s."""
    head = f"{'N':>7}  {'no-op s':>8}  {'s/shard':>9}  {'commit ms':>9}  {'first 10%':>9}  {'last 10%':>9}  {'compact s':>9}"
    lines = [head]
    for r in result["sizes"]:
        lines.append(
            f"{r['shards']:>7}  {r['noop_rerun_s']:>8.3f}  {r['noop_s_per_shard']:>9.2e}  {r['commit_ms']:>9.3f}  "
            f"{r['commit_ms_first_10pct']:>9.3f}  {r['commit_ms_last_10pct']:>9.3f}  {r['compact_s']:>9.3f}"
        )
    return "\n".join(lines)
