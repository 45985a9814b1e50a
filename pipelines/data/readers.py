"""Readers: one input shard -> blocks of raw rows (key, image bytes, caption, JSON meta,
and an edit chain's instructions and target images).

A shard is the unit of incremental work: a webdataset tar, a Parquet file, an Arrow file
of a Hugging Face `save_to_disk` folder, one shard of a Hugging Face dataset named by
`hf://NAME[:split]` (streamed through `datasets.load_dataset`, pipelines/data/hub.py), a
folder with `metadata.jsonl` (HF imagefolder) or a plain folder of images with sidecar
`.txt` captions. Any fsspec URL works; storage options (endpoint, credentials) come from
`data.storage_options` or the usual env vars. Which field of a sample is which (image,
caption, edit source, instruction and target) is `data.columns` (pipelines/data/fields.py).

A row the reader can already tell is broken (a tar key without image or caption, a caption
that is not UTF-8, an edit without its target or instruction) comes out quarantined with its
reason; a shard-level problem (not a tar, no caption column) raises ShardError naming the
shard, and only that shard fails.

Input is untrusted: a path read from the data (imagefolder `file_name`, HF image `path`)
must lead inside the shard's folder, a tar member that is a link or names a place outside
the archive is not read (pipelines/data/tars.py), and no file or member over
`data.max_member_bytes` is read. Each such row is quarantined with the reason, so
read = written + filtered + quarantined holds.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from uniloom.pipelines.data import hub
from uniloom.pipelines.data.config import ColumnsConfig, DataConfig
from uniloom.pipelines.data.fields import (
    Chain,
    ColumnRoles,
    Fields,
    column_roles,
    first,
    member_fields,
    round_items,
    text,
)
from uniloom.pipelines.data.fs import contained, open_fs
from uniloom.pipelines.data.schema import RAW_SCHEMA
from uniloom.pipelines.data.stages import OK, QUARANTINED
from uniloom.pipelines.data.tars import TarError, read_samples, split_name

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")


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
    meta: tuple[str, ...] = ()  # per file: cheap metadata that moves when it changes, or ''


class RowBlocks:
    """Collects rows and cuts them into Arrow blocks of `block_rows` rows."""

    def __init__(self, block_rows: int):
        self.block_rows = block_rows
        self.columns: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
        self.keys: set[str] = set()

    def add(self, key: str, row: Fields) -> pa.Table | None:
        reason = row.reason
        if reason is None and key in self.keys:
            reason = "duplicate key in the shard"
        if reason is None and row.image is None:
            reason = "no image"
        if reason is None and row.caption is None and not row.targets:
            reason = "no caption"  # an edit sample needs none
        self.keys.add(key)
        edits = (row.instructions, row.targets) if reason is None else (None, None)
        values = (
            key,
            row.image,
            row.caption,
            row.meta,
            *edits,
            OK if reason is None else QUARANTINED,
            reason,
        )
        for name, value in zip(RAW_SCHEMA.names, values):
            self.columns[name].append(value)
        return self.flush() if len(self.columns["key"]) >= self.block_rows else None

    def flush(self) -> pa.Table | None:
        if not self.columns["key"]:
            return None
        table = pa.table(self.columns, schema=RAW_SCHEMA)
        self.columns = {name: [] for name in RAW_SCHEMA.names}
        return table


def _too_big(what: str, cap: int) -> str:
    return f"{what} is larger than max_member_bytes ({cap} bytes)"


def _read_files(fs, paths: list[str], cap: int) -> dict[str, bytes | None]:
    """Many small files in one call (concurrent on object stores), at most cap + 1 bytes of
    each so an oversized one is seen without being read whole; missing ones are None (their
    row is quarantined). Any other failure is the store's, not the row's (a quarantined row
    is never read again), so it fails the shard, which the next run retries. Byte ranges
    rather than `fs.cat`, which would expand `*?[` in names as globs."""
    out = fs.cat_ranges(paths, 0, cap + 1, on_error="return") if paths else []
    for path, value in zip(paths, out):
        if isinstance(value, Exception) and not isinstance(value, FileNotFoundError):
            raise ShardError(f"could not read {path} ({value.__class__.__name__}: {value})")
    return {p: (v if isinstance(v, bytes) else None) for p, v in zip(paths, out)}


# ------------------------------------------------------------------------- webdataset tars


def read_tar(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    """All members are grouped by key before any row is emitted, so a key's image and
    caption stay together however the tar's members are ordered."""
    fs, _ = open_fs(shard.uri, cfg.storage_options)
    try:
        with fs.open(shard.files[0], "rb", block_size=8 << 20) as f:
            samples = read_samples(f, cfg.max_member_bytes)
    except TarError as e:
        raise ShardError(str(e)) from None
    except OSError as e:  # the store failed (after its client's own retries): not the tar's fault
        raise ShardError(f"could not read the tar ({e.__class__.__name__}: {e})") from None
    blocks = RowBlocks(cfg.exec.block_rows)
    samples.reverse()  # popped in key order, each sample's bytes freed once it is a row
    while samples:
        s = samples.pop()
        row = Fields(reason=s.refused) if s.refused else member_fields(s.key, s.members, cfg.columns)
        if block := blocks.add(s.key, row):
            yield block
    if block := blocks.flush():
        yield block


# ------------------------------------------------------------ Parquet, HF Arrow and the Hub


def _images(values: list, fs, folder: str | None, cap: int) -> tuple[list, list[str | None]]:
    """Image cells -> per cell (bytes or None, why it is refused or None). A cell is bytes,
    the struct {bytes, path} of the HF Image feature, or null. Without bytes, the file at
    `path` is read, which must lie inside the shard's `folder`; a streamed Hub dataset
    (folder None) has no folder, so its images must be embedded."""
    data: list = [None] * len(values)
    reasons: list[str | None] = [None] * len(values)
    wanted: dict[int, str] = {}
    for i, value in enumerate(values):
        blob, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
        if blob is not None and not isinstance(blob, bytes):
            reasons[i] = f"image is not binary data ({type(blob).__name__})"
        elif blob is not None:
            data[i] = blob
        elif path and folder is None:
            reasons[i] = f"image {path!r} is not embedded in the dataset"
        elif path:
            try:
                wanted[i] = contained(folder, path)
            except ValueError as e:
                reasons[i] = f"image path refused: {e}"
    found = _read_files(fs, sorted(set(wanted.values())), cap)
    for i, path in wanted.items():
        data[i] = found[path]
        if data[i] is None:
            reasons[i] = f"image file {values[i]['path']!r} cannot be read"
    for i, d in enumerate(data):
        if d is not None and len(d) > cap:
            data[i], reasons[i] = None, _too_big("image", cap)
    return data, reasons


def _chain(rounds: list[tuple[Any, Any]], data: list, refused: list) -> Chain:
    """One row's edit chain from its (instruction, target cell) rounds and their resolved
    target bytes; a row with no rounds is not an edit."""
    if not rounds:
        return None, None, None
    instructions = []
    for r, ((instruction, _), target, why) in enumerate(zip(rounds, data, refused)):
        instruction, bad = text(instruction, "instruction")
        if bad or not isinstance(instruction, str):
            return None, None, f"edit round {r}: {bad}" if bad else f"edit round {r} has no instruction"
        if why:
            return None, None, f"edit round {r} target: {why}"
        if target is None:
            return None, None, f"edit round {r} has no target image"
        instructions.append(instruction)
    return instructions, list(data), None


def _chains(batch, roles: ColumnRoles, cols: ColumnsConfig, fs, folder: str | None, cap: int) -> list[Chain]:
    """Every row's edit chain: all targets of the batch resolved in one call."""
    if roles.rounds:
        rows = [
            [(item.get(first(cols.instruction, item) or ""), item.get(first(cols.target, item) or ""))
             for item in round_items(cell)]
            for cell in batch.column(roles.rounds).to_pylist()
        ]  # fmt: skip
    elif roles.target:
        pairs = zip(batch.column(roles.instruction).to_pylist(), batch.column(roles.target).to_pylist())
        rows = [[] if s is None and t is None else [(s, t)] for s, t in pairs]
    else:
        return [(None, None, None)] * batch.num_rows
    data, refused = _images([t for rounds in rows for _, t in rounds], fs, folder, cap)
    chains, at = [], 0
    for rounds in rows:
        end = at + len(rounds)
        chains.append(_chain(rounds, data[at:end], refused[at:end]))
        at = end
    return chains


def _cells(batch, name: str | None) -> list | None:
    return batch.column(name).to_pylist() if name else None


def record_rows(
    batches: Iterable, roles: ColumnRoles, cfg: DataConfig, fs, folder: str | None
) -> Iterator[pa.Table]:
    """Arrow record batches or tables of a columnar shard -> blocks of raw rows."""
    blocks, row, cap = RowBlocks(cfg.exec.block_rows), 0, cfg.max_member_bytes
    for batch in batches:
        images, refused = _images(batch.column(roles.image).to_pylist(), fs, folder, cap)
        captions, keys, metas = (_cells(batch, name) for name in (roles.caption, roles.key, roles.meta))
        chains = _chains(batch, roles, cfg.columns, fs, folder, cap)
        for i, image in enumerate(images):
            key = str(keys[i]) if keys else f"{row:08d}"
            row += 1
            caption, why = text(captions[i]) if captions else (None, None)
            meta, _ = text(metas[i]) if metas else (None, None)
            instructions, targets, not_edit = chains[i]
            fields = Fields(image, caption, meta, instructions, targets, refused[i] or not_edit or why)
            if block := blocks.add(key, fields):
                yield block
    if block := blocks.flush():
        yield block


def _roles(names: list[str], cfg: DataConfig) -> ColumnRoles:
    try:
        return column_roles(names, cfg.columns)
    except ValueError as e:
        raise ShardError(str(e)) from None


def read_parquet(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    fs, _ = open_fs(shard.uri, cfg.storage_options)
    with fs.open(shard.files[0], "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise ShardError(f"not a readable Parquet file ({e})") from None
        roles = _roles(pf.schema_arrow.names, cfg)
        batches = pf.iter_batches(cfg.exec.block_rows, columns=roles.names)
        yield from record_rows(batches, roles, cfg, fs, posixpath.dirname(shard.files[0]))


def read_hf_arrow(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    """One Arrow file of a `Dataset.save_to_disk` folder (Arrow IPC stream format)."""
    fs, _ = open_fs(shard.uri, cfg.storage_options)
    with fs.open(shard.files[0], "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except (pa.ArrowException, OSError) as e:
            raise ShardError(f"not a readable Arrow stream ({e})") from None
        roles = _roles(reader.schema.names, cfg)
        yield from record_rows(reader, roles, cfg, fs, posixpath.dirname(shard.files[0]))


def read_hub(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    """One shard of a dataset named by `hf://NAME[:split]`, streamed by `datasets`."""
    try:
        names, tables = hub.shard_tables(shard.uri, shard.files[0], cfg.exec.block_rows)
    except hub.HubError as e:
        raise ShardError(str(e)) from None
    if names:  # else an empty shard of a dataset whose columns are known only from its rows
        yield from record_rows(tables, _roles(names, cfg), cfg, None, None)


# ------------------------------------------------------------------------ image folders


def _named_image(folder: str, name: str, images: set[str]) -> tuple[str | None, str | None]:
    """(path, None) for a metadata line's file_name, or (path or None, why it is refused)."""
    try:
        path = contained(folder, name)
    except ValueError as e:
        return None, f"file_name refused: {e}"
    if path not in images:
        return path, f"image file {name!r} is not among the shard's image files"
    return path, None


def read_imagefolder(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    """HF imagefolder: `metadata.jsonl` lines {"file_name": ..., "caption"/"text": ...}.
    A file_name must be one of the shard's image files (discovery lists them under the
    folder, and they are what its fingerprint hashes); an image no line names has no
    caption, and is quarantined as such."""
    fs, _ = open_fs(shard.uri, cfg.storage_options)
    metadata = next(p for p in shard.files if posixpath.basename(p) == "metadata.jsonl")
    folder = posixpath.dirname(metadata)
    try:
        lines = [json.loads(line) for line in fs.cat_file(metadata).decode().splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"metadata.jsonl is not JSON lines ({e})") from None
    if bad := next((n for n, line in enumerate(lines, 1) if not isinstance(line, dict)), None):
        raise ShardError(f"metadata.jsonl line {bad} is not a JSON object")
    captions = cfg.columns.caption
    if lines and not any(f in lines[0] for f in captions):
        raise ShardError(
            f"metadata.jsonl has no caption field (looked for {', '.join(captions)}; "
            f"has: {', '.join(lines[0])})"
        )
    images = {p for p in shard.files if p != metadata}
    unnamed = set(images)
    cap = cfg.max_member_bytes
    blocks, step = RowBlocks(cfg.exec.block_rows), cfg.exec.block_rows
    for start in range(0, len(lines), step):
        chunk = lines[start : start + step]
        names = [str(line.get("file_name", "")) for line in chunk]
        found = [_named_image(folder, name, images) for name in names]
        unnamed.difference_update(path for path, _ in found)
        data = _read_files(fs, sorted({path for path, why in found if not why}), cap)
        for line, name, (path, why) in zip(chunk, names, found):
            image = None if why else data[path]
            if why is None and image is None:
                why = f"image file {name!r} cannot be read"
            elif image is not None and len(image) > cap:
                image, why = None, _too_big(f"image file {name!r}", cap)
            caption = line.get(first(captions, line) or "")
            if not isinstance(caption, str | None):
                caption, why = None, why or f"caption is not text ({type(caption).__name__})"
            meta = json.dumps(line, sort_keys=True)
            if block := blocks.add(posixpath.splitext(name)[0], Fields(image, caption, meta, reason=why)):
                yield block
    for path in sorted(unnamed):
        name = posixpath.relpath(path, folder)
        why = f"image file {name!r} has no line in metadata.jsonl, so no caption"
        if block := blocks.add(posixpath.splitext(name)[0], Fields(reason=why)):
            yield block
    if block := blocks.flush():
        yield block


def _is_sample(fields: set[str], cols) -> bool:
    """Whether a key's fields make a sample: an image of any role, a caption or a JSON."""
    return any(f.rpartition(".")[2] in IMAGE_EXTS or f in cols.caption or f in cols.meta for f in fields)


def _folder_row(key: str, files: dict[str, str], data: dict[str, bytes | None], cap: int, cols) -> Fields:
    """One key's fields, from its files' `data` (field -> path as `files` says)."""
    if not any(name.rpartition(".")[2] in IMAGE_EXTS for name in files):
        names = ", ".join(sorted(posixpath.basename(p) for p in files.values()))
        return Fields(reason=f"no image file (has: {names})")
    members = {}
    for name, path in files.items():
        content = data.get(path)
        if content is None:
            return Fields(reason=f"file {posixpath.basename(path)!r} cannot be read")
        if len(content) > cap:
            return Fields(reason=_too_big(f"file {posixpath.basename(path)!r}", cap))
        members[name] = content
    return member_fields(key, members, cols)


def read_folder(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    """Files named as a webdataset tar names its members, unpacked: `a.jpg` + `a.txt`
    (+ `a.json`); an edit `a.src.png` + `a.tgt.png` + `a.txt`, or `a.json` listing rounds
    with `a.tgt0.png`, `a.tgt1.png`, ... (pipelines/data/fields.py reads both). A caption
    or JSON without an image is a row too, quarantined for it."""
    fs, _ = open_fs(shard.uri, cfg.storage_options)
    by_key: dict[str, dict[str, str]] = {}
    for path in shard.files:
        key, name = split_name(path)
        by_key.setdefault(key, {})[name] = path
    keys = sorted(k for k, files in by_key.items() if _is_sample(set(files), cfg.columns))
    blocks, step = RowBlocks(cfg.exec.block_rows), cfg.exec.block_rows
    for start in range(0, len(keys), step):
        chunk = keys[start : start + step]
        data = _read_files(fs, [p for k in chunk for p in by_key[k].values()], cfg.max_member_bytes)
        for key in chunk:
            name = posixpath.basename(key)
            row = _folder_row(name, by_key[key], data, cfg.max_member_bytes, cfg.columns)
            if block := blocks.add(name, row):
                yield block
    if block := blocks.flush():
        yield block


READERS = {
    "webdataset": read_tar,
    "parquet": read_parquet,
    "hf": read_hf_arrow,
    "imagefolder": read_imagefolder,
    "folder": read_folder,
    "hub": read_hub,
}


def read_shard(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    return READERS[shard.format](shard, cfg)
