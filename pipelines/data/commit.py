"""The driver's side of a run: rows stream in from Ray Data in any order; each shard's rows
are collected until its marker says it is complete, then shards commit in id order:

  dedup against the global index -> write output, index, quarantine and filtered tables
  under names of their own -> record them in the manifest (the commit) -> delete the files
  of the shard's previous entry.

Every file is named by its shard and a hash of its bytes, so new files never replace the
committed ones: a run killed before the manifest record leaves the old entry whole (its
files untouched), and one killed after it leaves old files that no entry names, which
`sweep` deletes at the start of the next run. The manifest entry lists each shard's files;
once a run has ended, `shards/*.parquet` holds exactly the manifest's output files.

Output layout under OUT (<shard> is the shard id made flat, <hash> its file's content hash):
  shards/<shard>.<hash>.parquet       the dataset (one file per input shard)
  _quarantine/<shard>.<hash>.parquet  rows that could not be used: source, key, reason
  _filtered/<shard>.<hash>.parquet    rows a filter rejected: source, key, reason (the filter)
  _index/<shard>.<hash>.parquet       dedup hashes of the kept rows
  _manifest.json, _manifest/, _lock.json, tokenizer/, _tmp/
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uniloom.pipelines.data.dedup import DedupIndex, index_table
from uniloom.pipelines.data.fs import is_local, join, replace, store_error, tmp_path
from uniloom.pipelines.data.lock import OutputLock
from uniloom.pipelines.data.manifest import (
    TABLES,
    Manifest,
    StageIdentity,
    entry_files,
    input_meta,
    output_name,
    shard_fingerprint,
)
from uniloom.pipelines.data.readers import InputShard
from uniloom.pipelines.data.schema import REJECTED_SCHEMA, output_schema
from uniloom.pipelines.data.stages import END, ERROR, FILTERED, OK, QUARANTINED


@dataclass
class OutputSpec:
    """What every output row records about how it was made."""

    image_size: int
    latent_shape: tuple[int, int]
    latent_dtype: str
    text_tokenizer: str
    image_tokenizer: str
    image_kind: str = "mingtok"  # tokenizer.kind: what the latents column holds (its metadata)


@dataclass
class ShardBuffer:
    shard: InputShard
    tables: list[pa.Table] = field(default_factory=list)
    seen: int = 0
    expected: int | None = None  # set by the shard's marker row
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.seen == self.expected

    def add(self, part: pa.Table) -> None:
        status = part.column("status")
        markers = part.filter(pc.greater_equal(status, END))
        for row in markers.select(["status", "reason", "shard_rows"]).to_pylist():
            self.expected = row["shard_rows"]
            if row["status"] == ERROR:
                self.error = row["reason"]
        data = part.filter(pc.less(status, END))
        self.seen += data.num_rows
        if data.num_rows and self.error is None:
            self.tables.append(data)


def write_parquet(fs, root: str, table: pa.Table, path: str) -> None:
    """Write under _tmp, then rename over `path`."""
    tmp = tmp_path(root, ".parquet")
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd", row_group_size=1024)
    replace(fs, tmp, path)


def shard_paths(manifest: Manifest, shard_id: str) -> dict[str, str]:
    """The paths of a committed shard's files, by kind (output, quarantine, ...)."""
    files = entry_files(shard_id, manifest.shards[shard_id])
    return {kind: join(manifest.root, rel) for kind, rel in files.items()}


def write_named(fs, root: str, folder: str, shard_id: str, table: pa.Table) -> str:
    """Write `table` as `folder/<shard>.<content hash>.parquet` unless that file exists
    (the same bytes); returns the path relative to `root`."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=1024)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:16]
    rel = f"{folder}/{output_name(shard_id).removesuffix('.parquet')}.{digest}.parquet"
    path = join(root, rel)
    if fs.exists(path):
        return rel
    if is_local(fs):  # appears whole: a kill mid-write leaves only a file under _tmp
        tmp = tmp_path(root, ".parquet")
        with store_error(fs, "write", path, tmp):
            with open(tmp, "wb") as f:
                f.write(data)
            replace(fs, tmp, path)
    else:  # one PUT: an object appears whole or not at all
        with store_error(fs, "write", path):
            fs.pipe_file(path, data)
    return rel


class Committer:
    def __init__(
        self,
        manifest: Manifest,
        todo: list[InputShard],
        hashes: dict[str, str],
        stage: StageIdentity,
        index: DedupIndex,
        spec: OutputSpec,
        on_commit: Callable[[str, dict[str, Any]], None] | None = None,
        lock: OutputLock | None = None,
    ):
        self.manifest, self.hashes, self.stage, self.index, self.spec = manifest, hashes, stage, index, spec
        self.lock = lock
        self.buffers = {s.id: ShardBuffer(s) for s in todo}
        self.order = [s.id for s in todo]
        self.next = 0
        self.committed: list[str] = []
        self.errors: list[str] = []
        self.on_commit = on_commit
        fs, root = manifest.fs, manifest.root
        for folder in ("_tmp", *TABLES.values()):
            with store_error(fs, "write", join(root, folder)):
                fs.makedirs(join(root, folder), exist_ok=True)

    def add(self, block: pa.Table) -> None:
        self.row_schema = block.schema  # markers carry it too, so a shard without rows has it
        shards = block.column("shard")
        for sid in pc.unique(shards).to_pylist():
            self.buffers[sid].add(block.filter(pc.equal(shards, sid)))
        self._drain()

    def _drain(self) -> None:
        while self.next < len(self.order) and self.buffers[self.order[self.next]].complete:
            buf = self.buffers.pop(self.order[self.next])
            if buf.error:
                self.errors.append(buf.error)
            else:
                self.commit(buf)
            self.next += 1

    def finish(self) -> None:
        self._drain()
        if self.next < len(self.order):
            raise RuntimeError(f"the stream ended before shard {self.order[self.next]} was complete")

    def commit(self, buf: ShardBuffer) -> None:
        shard = buf.shard
        rows = pa.concat_tables(buf.tables) if buf.tables else self.row_schema.empty_table()
        rows = rows.sort_by("key")
        ok = rows.filter(pc.equal(rows.column("status"), OK))
        shas = ok.column("sha").to_pylist()
        phashes = ok.column("phash").to_numpy(zero_copy_only=False)
        keep, dup_reasons, owners = self.index.decide(shas, phashes)
        kept = ok.filter(pa.array(keep, pa.bool_()))
        rejected = self._rejected(shard, rows, ok, keep, dup_reasons)
        counts = self._counts(buf.expected, kept, rejected)
        files = self._write(shard, kept, rejected)
        self.index.add(shard.id, kept.column("sha").to_pylist(), phashes[keep])
        old = self.manifest.shards.get(shard.id)
        if self.lock is not None:
            self.lock.check()
        self.manifest.put(
            shard.id,
            {
                "source": shard.uri,
                "format": shard.format,
                "input_hash": self.hashes[shard.id],
                "input_meta": input_meta(shard),
                "stage": dataclasses.asdict(self.stage),
                "fingerprint": shard_fingerprint(self.hashes[shard.id], self.stage),
                "output": files["output"],
                "files": files,
                "rows": counts,
                # each owner with the index it had: the planner redoes this shard when the
                # owner's kept rows change, even if a kill came between the two commits
                "dedup_against": {
                    o: entry_files(o, self.manifest.shards[o])["index"] for o in sorted(owners - {shard.id})
                },
                "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        if old is not None:
            _delete(self.manifest, set(entry_files(shard.id, old).values()) - set(files.values()))
        self.committed.append(shard.id)
        if self.on_commit:
            self.on_commit(shard.id, counts)

    def _rejected(self, shard, rows, ok, keep, dup_reasons) -> dict[str, pa.Table]:
        """(source, key, reason) of quarantined rows, and of filtered rows with dedup's."""
        out = {}
        for kind, code in (("quarantine", QUARANTINED), ("filtered", FILTERED)):
            part = rows.filter(pc.equal(rows.column("status"), code))
            keys, reasons = part.column("key").to_pylist(), part.column("reason").to_pylist()
            if kind == "filtered":
                dropped = np.flatnonzero(~keep)
                keys += ok.column("key").take(pa.array(dropped, pa.int64())).to_pylist()
                reasons += [dup_reasons[i] for i in dropped]
            out[kind] = pa.table(
                {"source": pa.repeat(shard.uri, len(keys)), "key": keys, "reason": reasons},
                schema=REJECTED_SCHEMA,
            )
        return out

    @staticmethod
    def _counts(read: int, kept: pa.Table, rejected: dict[str, pa.Table]) -> dict[str, Any]:
        filtered = dict(sorted(Counter(rejected["filtered"].column("reason").to_pylist()).items()))
        quarantined = rejected["quarantine"].num_rows
        if read != kept.num_rows + sum(filtered.values()) + quarantined:  # a bug, never bad input
            raise RuntimeError(
                f"row accounting broke: {read} read, {kept.num_rows} kept, {filtered}, {quarantined}"
            )
        return {"read": read, "written": kept.num_rows, "filtered": filtered, "quarantined": quarantined}

    def _write(self, shard: InputShard, kept: pa.Table, rejected: dict[str, pa.Table]) -> dict[str, str]:
        """The shard's files under new names; the manifest (by the caller) commits them."""
        fs, root = self.manifest.fs, self.manifest.root
        shas, phashes = kept.column("sha").to_pylist(), kept.column("phash").to_numpy(zero_copy_only=False)
        tables = {
            "quarantine": rejected["quarantine"],
            "filtered": rejected["filtered"],
            "index": index_table(kept.column("key").to_pylist(), shas, phashes),
            "output": output_table(kept, shard.uri, self.spec),
        }
        return {kind: write_named(fs, root, TABLES[kind], shard.id, table) for kind, table in tables.items()}


def output_table(kept: pa.Table, source: str, spec: OutputSpec) -> pa.Table:
    """A shard's kept rows (prepared and encoded) -> the output shard's columns."""
    schema = output_schema(spec.latent_shape, spec.latent_dtype, spec.image_kind)
    if kept.num_rows == 0:
        return schema.empty_table()
    n = kept.num_rows
    col = kept.column
    columns = {
        "key": col("key"),
        "source": pa.repeat(source, n),
        "caption": col("caption"),
        "text_ids": col("text_ids"),
        "latents": col("latents").cast(pa.binary()),
        "latent_shape": pa.repeat(pa.scalar(list(spec.latent_shape), pa.list_(pa.int32())), n),
        "latent_dtype": pa.repeat(spec.latent_dtype, n),
        "width": col("width"),
        "height": col("height"),
        "image_size": pa.repeat(pa.scalar(spec.image_size, pa.int32()), n),
        "content_hash": pa.array([s.hex() for s in col("sha").to_pylist()], pa.string()),
        "text_tokenizer": pa.repeat(spec.text_tokenizer, n),
        "image_tokenizer": pa.repeat(spec.image_tokenizer, n),
        "edit_latents": col("edit_latents").cast(pa.list_(pa.binary())),
    }
    for name in (
        "meta",
        "vqa",
        "vqa_question_ids",
        "vqa_answer_ids",
        "edit_instruction",
        "edit_instruction_ids",
    ):
        columns[name] = col(name)
    return pa.table([columns[f.name] for f in schema], schema=schema)


def _delete(manifest: Manifest, rels: set[str]) -> None:
    paths = [join(manifest.root, rel) for rel in sorted(rels)]
    paths = [p for p in paths if manifest.fs.exists(p)]
    if paths:
        with store_error(manifest.fs, "delete", paths[0]):
            manifest.fs.rm(paths)


def remove_shard(manifest: Manifest, shard_id: str) -> None:
    """An input disappeared: forget it in the manifest first, then delete its files."""
    entry = manifest.shards.get(shard_id)
    if entry is None:
        return
    manifest.remove(shard_id)
    _delete(manifest, set(entry_files(shard_id, entry).values()))


def sweep(manifest: Manifest) -> int:
    """Delete what a killed run left behind: temporary files, files written for a commit
    that never happened, and files of replaced entries that were not deleted yet."""
    fs, root = manifest.fs, manifest.root
    owned = {join(root, rel) for sid, e in manifest.shards.items() for rel in entry_files(sid, e).values()}
    stray = []
    for folder in ("_tmp", *TABLES.values()):
        path = join(root, folder)
        fs.invalidate_cache(path)
        try:
            listed = fs.ls(path, detail=False)
        except FileNotFoundError:
            continue
        stray += [f for f in listed if folder == "_tmp" or f not in owned]
    if stray:
        with store_error(fs, "delete", stray[0]):
            fs.rm(stray)
    return len(stray)
