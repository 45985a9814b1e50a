"""A data run: find the input shards, compare them with the manifest, process exactly the
new and stale ones on Ray Data, and commit each shard as it completes.

    read task per shard -> blocks of data.exec.block_rows rows
      -> actor pool: Prepare (decode, filter, crop, hash, tokenize text), which Ray Data
         fuses with the image tokenizer's encoder (tokenizer.kind's values: latents or
         codes, and the edit targets'): one model per actor
      -> driver: Committer (dedup, write, manifest record, delete replaced files)

One run at a time per output (pipelines/data/lock.py). Nothing starts Ray when nothing has
to be processed, so an unchanged rerun costs the listing of the inputs and the manifest;
input content is hashed only where a file's metadata moved (pipelines/data/discovery.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from uniloom.pipelines.config import UniloomConfig
from uniloom.pipelines.data import text_tokenizer
from uniloom.pipelines.data.commit import Committer, OutputSpec, remove_shard, shard_paths, sweep
from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.dedup import DedupIndex, stale_failures
from uniloom.pipelines.data.discovery import content_hashes, discover, input_uri
from uniloom.pipelines.data.image_tokenizer import fingerprint as image_fingerprint
from uniloom.pipelines.data.image_tokenizer import resolve_weights
from uniloom.pipelines.data.lock import OutputLock
from uniloom.pipelines.data.manifest import (
    Manifest,
    Plan,
    StageIdentity,
    code_version,
    config_hash,
    plan,
    record_touched,
)
from uniloom.pipelines.data.readers import InputShard
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.tokenizer.kinds import kind_for_config, kind_of

log = logging.getLogger(__name__)


def preflight(cfg: UniloomConfig, inputs: list[str], output: str | None = None) -> None:
    """The checks that need no work: weights exist and load, inputs exist and hold shards,
    no other run is writing the output (`run` takes the output's lease itself)."""
    if not inputs:
        raise UniloomError("no --input given")
    resolve_weights(cfg)
    discover(inputs, cfg.data)
    if output is not None:
        OutputLock(output, cfg.data.storage_options).check_free()


def prepare_run(cfg: UniloomConfig, inputs: list[str], output: str, train: bool = True) -> dict[str, Any]:
    """Everything up to the plan: the effective config (the tokenizer weights' own kind
    and architecture, their resolved path), shards, hashes, tokenizers, stage identity."""
    uri, weights, tok_cfg = resolve_weights(cfg)
    kind = kind_for_config(tok_cfg).name
    cfg = dataclasses.replace(cfg, **{kind: tok_cfg}, tokenizer=dataclasses.replace(cfg.tokenizer, kind=kind),
                              data=dataclasses.replace(cfg.data, tokenizer_weights=uri))  # fmt: skip
    d = cfg.data
    skipped: Counter[str] = Counter()
    shards = discover(inputs, d, skipped)
    manifest = Manifest.load(output, d.storage_options)
    hashes = content_hashes(shards, d.storage_options, manifest.shards)  # only where metadata moved
    text = text_tokenizer.resolve(d, manifest, shards, train)
    stage = StageIdentity(
        config=config_hash(d, tok_cfg),
        text_tokenizer=text.fingerprint if text else "(to be trained)",
        image_tokenizer=image_fingerprint(tok_cfg, weights),
        code=code_version(),
    )
    return {
        "cfg": cfg,
        "tokenizer": tok_cfg,
        "shards": shards,
        "hashes": hashes,
        "manifest": manifest,
        "text": text,
        "stage": stage,
        "plan": plan(shards, hashes, stage, manifest),
        "skipped_paths": dict(sorted(skipped.items())),
    }


def _read_index(manifest: Manifest, sid: str):
    import pyarrow.parquet as pq

    with manifest.fs.open(shard_paths(manifest, sid)["index"], "rb") as f:
        return pq.read_table(f)


def _load_index(d: DataConfig, manifest: Manifest, done: list[str]) -> DedupIndex:
    index = DedupIndex(d.filters)
    for sid in done:  # committed, up-to-date shards only: redone ones re-enter at commit
        index.add_table(sid, _read_index(manifest, sid))
    return index


def withdraw_stale_failures(manifest: Manifest, p: Plan, committer: Committer) -> dict[str, str]:
    """Failed shards whose previous output disagrees with what this run committed
    (dedup.stale_failures) lose it; returns them with the reason."""
    committed = set(committer.committed)
    failed = [s.id for s in p.todo if s.id not in committed]
    withdrawn = stale_failures(
        committer.index,
        manifest.shards,
        failed,
        committed | set(p.removed),
        lambda sid: _read_index(manifest, sid),
    )
    for sid, why in withdrawn.items():
        remove_shard(manifest, sid)
        log.warning("shard %s failed, and its previous output was withdrawn: %s", sid, why)
    return withdrawn


def execute(cfg: UniloomConfig, todo: list[InputShard], text, committer: Committer) -> float:
    """Run the Ray Data pipeline over `todo`, feeding the committer; returns Ray's start-up
    seconds (zero when Ray was already up)."""
    from uniloom.pipelines.data.image_tokenizer import Encoder
    from uniloom.pipelines.data.prepare import Prepare
    from uniloom.pipelines.data.source import ShardSource
    from uniloom.pipelines.raycluster import init_ray

    tok_cfg = kind_of(cfg).config(cfg)  # prepare_run set the kind and section of the weights
    start = time.perf_counter()
    ray = init_ray(cfg.ray)
    startup = time.perf_counter() - start
    d, e = cfg.data, cfg.data.exec
    ds = ray.data.read_datasource(ShardSource(todo, d), override_num_blocks=len(todo), num_cpus=e.task_cpus)
    # Ray Data coalesces a read task's output into blocks of up to 128 MiB: a whole shard of
    # compressed images. Blocks of block_rows rows let every actor work on one shard.
    ds = ds.repartition(target_num_rows_per_block=e.block_rows)
    # Its tasks would ask 1 CPU (repartition takes no remote args): on a cluster of 1-CPU
    # nodes where the encoder actors hold half of each, such a task never schedules.
    ds._logical_plan.dag.ray_remote_args["num_cpus"] = e.task_cpus
    ds = ds.map_batches(
        Prepare(d, tok_cfg.image_size, text),
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=e.task_cpus,
    )
    ds = ds.map_batches(
        Encoder,
        fn_constructor_kwargs={
            "tokenizer": asdict(tok_cfg),
            "weights_uri": d.tokenizer_weights,
            "storage_options": d.storage_options,
            "exec_cfg": asdict(e),
            "latent_dtype": d.latent_dtype,
            "precision": d.precision,
            "kind": cfg.tokenizer.kind,
        },
        batch_format="pyarrow",
        batch_size=e.encode_batch,
        compute=ray.data.ActorPoolStrategy(size=e.encode_actors),
        num_cpus=e.actor_cpus,
        num_gpus=e.actor_gpus,
    )
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        committer.add(block)
    committer.finish()
    return startup


def run(
    cfg: UniloomConfig,
    inputs: list[str],
    output: str,
    on_commit: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Bring `output` up to date with `inputs`; returns the summary (errors included:
    shards that could not be read are listed, every other shard is committed)."""
    start = time.perf_counter()
    if not inputs:
        raise UniloomError("no --input given")
    with OutputLock(output, cfg.data.storage_options) as lock:
        return _run(cfg, inputs, output, on_commit, lock, start)


def _run(
    cfg: UniloomConfig,
    inputs: list[str],
    output: str,
    on_commit: Callable[[str, dict[str, Any]], None] | None,
    lock: OutputLock,
    start: float,
) -> dict[str, Any]:
    state = prepare_run(cfg, inputs, output)
    cfg = state["cfg"]
    d = cfg.data
    manifest, p, stage = state["manifest"], state["plan"], state["stage"]
    swept = sweep(manifest)
    for sid in p.removed:
        remove_shard(manifest, sid)
    record_touched(manifest, p)
    spec = record_run(manifest, state, inputs)
    manifest.save()  # also folds in the records of a killed run
    index = _load_index(d, manifest, p.done) if p.todo else DedupIndex(d.filters)
    committer = Committer(manifest, p.todo, state["hashes"], stage, index, spec, on_commit, lock)
    ray_startup = execute(cfg, p.todo, state["text"], committer) if p.todo else 0.0
    withdrawn = withdraw_stale_failures(manifest, p, committer)
    if manifest.pending:
        manifest.save()
    seconds = time.perf_counter() - start
    summary = summarize(manifest, p, committer, seconds, ray_startup, swept)
    return {**summary, "skipped_paths": state["skipped_paths"], "withdrawn": withdrawn}


def record_run(manifest: Manifest, state: dict[str, Any], inputs: list[str]) -> OutputSpec:
    """Record in the manifest how this run makes its rows (inputs, config, the image
    tokenizer's weights, fingerprint and kind); returns what every output row records."""
    cfg, tok_cfg, stage = state["cfg"], state["tokenizer"], state["stage"]
    d, kind = cfg.data, kind_for_config(tok_cfg)
    recorded = {k: v for k, v in asdict(d).items() if k != "storage_options"}  # may hold secrets
    manifest.data.update(
        inputs=[input_uri(uri, d.storage_options) for uri in inputs],
        config={"preset": cfg.preset, "data": recorded, "kind": kind.name, kind.name: asdict(tok_cfg)},
        image_tokenizer={
            "weights": d.tokenizer_weights,
            "fingerprint": stage.image_tokenizer,
            "kind": kind.name,
        },
    )
    return OutputSpec(
        image_size=tok_cfg.image_size,
        latent_shape=kind.token_shape(tok_cfg),
        latent_dtype=kind.dtype(tok_cfg, d.latent_dtype),
        text_tokenizer=stage.text_tokenizer,
        image_tokenizer=stage.image_tokenizer,
        image_kind=kind.name,
    )


def summarize(manifest: Manifest, p: Plan, committer: Committer, seconds: float, startup: float, swept: int):
    totals: dict[str, Any] = {"read": 0, "written": 0, "quarantined": 0, "filtered": {}}
    for sid in committer.committed:
        rows = manifest.shards[sid]["rows"]
        for key in ("read", "written", "quarantined"):
            totals[key] += rows[key]
        for name, n in rows["filtered"].items():
            totals["filtered"][name] = totals["filtered"].get(name, 0) + n
    work = max(seconds - startup, 1e-9)
    return {
        "output": manifest.uri,
        "shards": {
            "processed": len(committer.committed),
            "up_to_date": len(p.done),
            "removed": len(p.removed),
            "failed": len(committer.errors),
        },
        "reasons": dict(sorted(p.reasons.items())),
        "rows": totals,
        "output_rows": sum(e["rows"]["written"] for e in manifest.shards.values()),
        "seconds": round(seconds, 3),
        "ray_startup_s": round(startup, 3),
        "images_per_s": round(totals["read"] / work, 1),
        "swept_files": swept,
        "errors": committer.errors,
    }
