"""Readers: one input shard -> blocks of raw rows (key, image bytes, caption, JSON meta).

A shard is the unit of incremental work: a webdataset tar, a Parquet file, an Arrow file
of a Hugging Face `save_to_disk` folder, a folder with `metadata.jsonl` (HF imagefolder)
or a plain folder of images with sidecar `.txt` captions. Any fsspec URL works; storage
options (endpoint, credentials) come from `data.storage_options` or the usual env vars.

A row the reader can already tell is broken (a tar key without image or caption, a caption
that is not UTF-8) comes out quarantined with its reason; a shard-level problem (not a tar,
no caption column) raises ShardError naming the shard, and only that shard fails.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.fs import open_fs
from uniloom.pipelines.data.schema import RAW_SCHEMA
from uniloom.pipelines.data.stages import OK, QUARANTINED

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
META_FIELDS = ("json", "meta")


class ShardError(Exception):
    """The shard as a whole cannot be read: the message names what is wrong with it."""


@dataclass(frozen=True)
class InputShard:
    id: str  # stable name of the shard: its path relative to the input root
    uri: str  # where it is (a file, or a folder for imagefolder/folder shards)
    format: str
    files: tuple[str, ...]  # the files whose content makes the shard (paths in its filesystem)
    size: int  # bytes, all files together
    stamps: tuple[str, ...] = ()  # per file: a content hash the store keeps (ETag), or ''


class RowBlocks:
    """Collects rows and cuts them into Arrow blocks of `block_rows` rows."""

    def __init__(self, block_rows: int):
        self.block_rows = block_rows
        self.columns: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
        self.keys: set[str] = set()

    def add(self, key, image=None, caption=None, meta=None, reason: str | None = None) -> pa.Table | None:
        if reason is None and key in self.keys:
            reason = "duplicate key in the shard"
        if reason is None and image is None:
            reason = "no image"
        if reason is None and caption is None:
            reason = "no caption"
        self.keys.add(key)
        for name, value in zip(
            RAW_SCHEMA.names, (key, image, caption, meta, OK if reason is None else QUARANTINED, reason)
        ):
            self.columns[name].append(value)
        return self.flush() if len(self.columns["key"]) >= self.block_rows else None

    def flush(self) -> pa.Table | None:
        if not self.columns["key"]:
            return None
        table = pa.table(self.columns, schema=RAW_SCHEMA)
        self.columns = {name: [] for name in RAW_SCHEMA.names}
        return table


def _text(data: bytes | str | None) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for a caption or JSON member."""
    if data is None or isinstance(data, str):
        return data, None
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "caption is not UTF-8"


def _first(fields, available) -> str | None:
    return next((f for f in fields if f in available), None)


# ------------------------------------------------------------------------- webdataset tars


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the basename."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def read_tar(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    """All members are grouped by key before any row is emitted, so a key's image and
    caption stay together however the tar's members are ordered."""
    fs, _ = open_fs(shard.uri, cfg.storage_options)
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with (
            fs.open(shard.files[0], "rb", block_size=8 << 20) as f,
            tarfile.open(fileobj=f, mode="r|*") as tar,
        ):
            for member in tar:
                if member.isfile():
                    key, ext = _split_member(member.name)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"not a readable tar ({e.__class__.__name__}: {e})") from None
    blocks = RowBlocks(cfg.exec.block_rows)
    for key in sorted(samples):
        members = samples.pop(key)
        image_ext = _first(cfg.image_fields, members)
        caption, reason = _text(members.get(_first(cfg.caption_fields, members) or ""))
        meta, _ = _text(members.get(_first(META_FIELDS, members) or ""))
        if image_ext is None:
            reason = f"no image member (has: {', '.join(sorted(members))})"
        if block := blocks.add(key, members.get(image_ext), caption, meta, reason):
            yield block
    if block := blocks.flush():
        yield block


# ------------------------------------------------------------------- Parquet and HF Arrow


def _columns(names: list[str], cfg: DataConfig) -> dict[str, str | None]:
    image, caption = _first(cfg.image_fields, names), _first(cfg.caption_fields, names)
    if image is None or caption is None:
        what = "image" if image is None else "caption"
        wanted = cfg.image_fields if image is None else cfg.caption_fields
        raise ShardError(f"no {what} column (looked for {', '.join(wanted)}; has: {', '.join(names)})")
    key = cfg.key_field if cfg.key_field in names else None
    return {"image": image, "caption": caption, "key": key, "meta": _first(META_FIELDS, names)}


def _image_bytes(column: pa.Array, fs, folder: str) -> list:
    """Binary column, or the struct<bytes, path> of the HF Image feature: bytes when
    embedded, else the file at `path` (relative paths from the shard's folder)."""
    if not pa.types.is_struct(column.type):
        return column.to_pylist()
    data = column.field("bytes").to_pylist()
    paths = (
        column.field("path").to_pylist() if column.type.get_field_index("path") >= 0 else [None] * len(data)
    )
    wanted = {i: posixpath.join(folder, p) for i, (d, p) in enumerate(zip(data, paths)) if d is None and p}
    found = _cat(fs, sorted(set(wanted.values())))
    for i, path in wanted.items():
        data[i] = found.get(path)
    return data


def _record_batches(
    batches, cols: dict[str, str | None], cfg: DataConfig, fs, folder: str
) -> Iterator[pa.Table]:
    blocks, row = RowBlocks(cfg.exec.block_rows), 0
    for batch in batches:
        images = _image_bytes(batch.column(cols["image"]), fs, folder)
        captions = batch.column(cols["caption"]).to_pylist()
        keys = batch.column(cols["key"]).to_pylist() if cols["key"] else None
        metas = batch.column(cols["meta"]).to_pylist() if cols["meta"] else None
        for i, image in enumerate(images):
            key = str(keys[i]) if keys else f"{row:08d}"
            caption, reason = _text(captions[i])
            meta, _ = _text(metas[i]) if metas else (None, None)
            row += 1
            if block := blocks.add(key, image, caption, meta if isinstance(meta, str) else None, reason):
                yield block
    if block := blocks.flush():
        yield block


def read_parquet(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    fs, _ = open_fs(shard.uri, cfg.storage_options)
    with fs.open(shard.files[0], "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise ShardError(f"not a readable Parquet file ({e})") from None
        cols = _columns(pf.schema_arrow.names, cfg)
        wanted = [c for c in cols.values() if c]
        batches = pf.iter_batches(cfg.exec.block_rows, columns=wanted)
        yield from _record_batches(batches, cols, cfg, fs, posixpath.dirname(shard.files[0]))


def read_hf_arrow(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    """One Arrow file of a `Dataset.save_to_disk` folder (Arrow IPC stream format)."""
    fs, _ = open_fs(shard.uri, cfg.storage_options)
    with fs.open(shard.files[0], "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except (pa.ArrowException, OSError) as e:
            raise ShardError(f"not a readable Arrow stream ({e})") from None
        cols = _columns(reader.schema.names, cfg)
        yield from _record_batches(reader, cols, cfg, fs, posixpath.dirname(shard.files[0]))


# ------------------------------------------------------------------------ image folders


def _cat(fs, paths: list[str]) -> dict[str, bytes | None]:
    """Many small files in one call (concurrent on object stores); missing ones are None."""
    out = fs.cat(paths, on_error="return") if paths else {}
    return {p: (v if isinstance(v, bytes) else None) for p, v in out.items()}


def read_imagefolder(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    """HF imagefolder: `metadata.jsonl` lines {"file_name": ..., "caption"/"text": ...}."""
    fs, _ = open_fs(shard.uri, cfg.storage_options)
    metadata = next(p for p in shard.files if posixpath.basename(p) == "metadata.jsonl")
    folder = posixpath.dirname(metadata)
    try:
        lines = [json.loads(line) for line in fs.cat_file(metadata).decode().splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"metadata.jsonl is not JSON lines ({e})") from None
    if lines and not any(f in lines[0] for f in cfg.caption_fields):
        raise ShardError(
            f"metadata.jsonl has no caption field (looked for {', '.join(cfg.caption_fields)}; "
            f"has: {', '.join(lines[0])})"
        )
    blocks, step = RowBlocks(cfg.exec.block_rows), cfg.exec.block_rows
    for start in range(0, len(lines), step):
        chunk = lines[start : start + step]
        paths = [posixpath.join(folder, str(line.get("file_name", ""))) for line in chunk]
        data = _cat(fs, [p for p in paths if not p.endswith("/")])
        for line, path in zip(chunk, paths):
            name = str(line.get("file_name", ""))
            caption = line.get(_first(cfg.caption_fields, line) or "")
            reason = None if data.get(path) is not None else f"image file {name!r} is missing"
            key = posixpath.splitext(name)[0]
            meta = json.dumps(line, sort_keys=True)
            if block := blocks.add(key, data.get(path), caption, meta, reason):
                yield block
    if block := blocks.flush():
        yield block


def read_folder(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    """Images with sidecars of the same stem: `a.jpg` + `a.txt` (+ optional `a.json`)."""
    fs, _ = open_fs(shard.uri, cfg.storage_options)
    by_stem: dict[str, dict[str, str]] = {}
    for path in shard.files:
        stem, ext = posixpath.splitext(path)
        by_stem.setdefault(stem, {})[ext[1:].lower()] = path
    stems = sorted(s for s, m in by_stem.items() if any(e in IMAGE_EXTS for e in m))
    blocks, step = RowBlocks(cfg.exec.block_rows), cfg.exec.block_rows
    for start in range(0, len(stems), step):
        chunk = stems[start : start + step]
        wanted = []
        for stem in chunk:
            m = by_stem[stem]
            picks = (_first(IMAGE_EXTS, m), _first(cfg.caption_fields, m), _first(META_FIELDS, m))
            wanted += [m[e] for e in picks if e]
        data = _cat(fs, wanted)
        for stem in chunk:
            m = by_stem[stem]
            image = data.get(m[_first(IMAGE_EXTS, m)])
            cap_ext, meta_ext = _first(cfg.caption_fields, m), _first(META_FIELDS, m)
            caption, reason = _text(data.get(m[cap_ext]) if cap_ext else None)
            meta, _ = _text(data.get(m[meta_ext]) if meta_ext else None)
            if block := blocks.add(posixpath.basename(stem), image, caption, meta, reason):
                yield block
    if block := blocks.flush():
        yield block


READERS = {
    "webdataset": read_tar,
    "parquet": read_parquet,
    "hf": read_hf_arrow,
    "imagefolder": read_imagefolder,
    "folder": read_folder,
}


def read_shard(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    return READERS[shard.format](shard, cfg)
