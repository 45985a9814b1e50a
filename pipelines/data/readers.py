"""Readers: one input shard -> blocks of raw rows (key, image bytes, caption, JSON meta).

A shard is the unit of incremental work: a webdataset tar, a Parquet file, an Arrow file
of a Hugging Face `save_to_disk` folder, a folder with `metadata.jsonl` (HF imagefolder)
or a plain folder of images with sidecar `.txt` captions. Any fsspec URL works; storage
options (endpoint, credentials) come from `data.storage_options` or the usual env vars.

A row the reader can already tell is broken (a tar key without image or caption, a caption
that is not UTF-8) comes out quarantined with its reason; a shard-level problem (not a tar,
no caption column) raises ShardError naming the shard, and only that shard fails.

Input is untrusted: a path read from the data (imagefolder `file_name`, HF image `path`)
must lead inside the shard's folder, a tar member that is a link or names a place outside
the archive is not read, and no file or member over `data.max_member_bytes` is read. Each
such row is quarantined with the reason, so read = written + filtered + quarantined holds.
"""

from __future__ import annotations

import gzip
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.fs import contained, open_fs
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
    meta: tuple[str, ...] = ()  # per file: cheap metadata that moves when it changes, or ''


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


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the basename."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


MEMBER_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}


def _refused_member(member: tarfile.TarInfo, cap: int) -> str | None:
    """Why a member is not read, or None. Nothing is ever extracted to disk, but a sample
    with a link, a name outside the archive or an oversized member is not trusted whole."""
    name = member.name
    if not member.isfile():
        kind = MEMBER_KINDS.get(member.type, f"of tar type {member.type!r}")
        return f"member {name!r} is {kind}, which is not followed"
    if name.startswith("/") or ".." in name.split("/"):
        return f"member name {name!r} leads outside the archive"
    if member.size > cap:
        return _too_big(f"member {name!r} ({member.size} bytes)", cap)
    return None


def read_tar(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    """All members are grouped by key before any row is emitted, so a key's image and
    caption stay together however the tar's members are ordered."""
    fs, _ = open_fs(shard.uri, cfg.storage_options)
    samples: dict[str, dict[str, bytes]] = {}
    refused: dict[str, str] = {}  # key -> why its sample is quarantined (its first bad member)
    try:
        with (
            fs.open(shard.files[0], "rb", block_size=8 << 20) as f,
            tarfile.open(fileobj=f, mode="r|*") as tar,
        ):
            for member in tar:
                if member.isdir():
                    continue
                key, ext = _split_member(member.name)
                members = samples.setdefault(key, {})
                if why := _refused_member(member, cfg.max_member_bytes):
                    refused.setdefault(key, why)
                else:
                    members[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, gzip.BadGzipFile) as e:
        raise ShardError(f"not a readable tar ({e.__class__.__name__}: {e})") from None
    except OSError as e:  # the store failed (after its client's own retries): not the tar's fault
        raise ShardError(f"could not read the tar ({e.__class__.__name__}: {e})") from None
    blocks = RowBlocks(cfg.exec.block_rows)
    for key in sorted(samples):
        members = samples.pop(key)
        if key in refused:
            block = blocks.add(key, reason=refused[key])
        else:
            image_ext = _first(cfg.image_fields, members)
            caption, reason = _text(members.get(_first(cfg.caption_fields, members) or ""))
            meta, _ = _text(members.get(_first(META_FIELDS, members) or ""))
            if image_ext is None:
                reason = f"no image member (has: {', '.join(sorted(members))})"
            block = blocks.add(key, members.get(image_ext), caption, meta, reason)
        if block:
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


def _image_bytes(column: pa.Array, fs, folder: str, cap: int) -> tuple[list, list[str | None]]:
    """Binary column, or the struct<bytes, path> of the HF Image feature: bytes when
    embedded, else the file at `path`, which must lie inside the shard's folder. Per row:
    the bytes (None when refused) and why the row is quarantined (None when it is not)."""
    if pa.types.is_struct(column.type):
        data = column.field("bytes").to_pylist()
        has_path = column.type.get_field_index("path") >= 0
        paths = column.field("path").to_pylist() if has_path else [None] * len(data)
    else:
        data, paths = column.to_pylist(), [None] * len(column)
    reasons: list[str | None] = [None] * len(data)
    wanted: dict[int, str] = {}
    for i, (d, p) in enumerate(zip(data, paths)):
        if d is None and p:
            try:
                wanted[i] = contained(folder, p)
            except ValueError as e:
                reasons[i] = f"image path refused: {e}"
    found = _read_files(fs, sorted(set(wanted.values())), cap)
    for i, path in wanted.items():
        data[i] = found[path]
        if data[i] is None:
            reasons[i] = f"image file {paths[i]!r} cannot be read"
    for i, d in enumerate(data):
        if d is not None and len(d) > cap:
            data[i], reasons[i] = None, _too_big("image", cap)
    return data, reasons


def _record_batches(
    batches, cols: dict[str, str | None], cfg: DataConfig, fs, folder: str
) -> Iterator[pa.Table]:
    blocks, row = RowBlocks(cfg.exec.block_rows), 0
    for batch in batches:
        images, refused = _image_bytes(batch.column(cols["image"]), fs, folder, cfg.max_member_bytes)
        captions = batch.column(cols["caption"]).to_pylist()
        keys = batch.column(cols["key"]).to_pylist() if cols["key"] else None
        metas = batch.column(cols["meta"]).to_pylist() if cols["meta"] else None
        for i, image in enumerate(images):
            key = str(keys[i]) if keys else f"{row:08d}"
            caption, reason = _text(captions[i])
            meta, _ = _text(metas[i]) if metas else (None, None)
            row += 1
            meta = meta if isinstance(meta, str) else None
            if block := blocks.add(key, image, caption, meta, refused[i] or reason):
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
    if lines and not any(f in lines[0] for f in cfg.caption_fields):
        raise ShardError(
            f"metadata.jsonl has no caption field (looked for {', '.join(cfg.caption_fields)}; "
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
            caption = line.get(_first(cfg.caption_fields, line) or "")
            if not isinstance(caption, str | None):
                caption, why = None, why or f"caption is not text ({type(caption).__name__})"
            meta = json.dumps(line, sort_keys=True)
            if block := blocks.add(posixpath.splitext(name)[0], image, caption, meta, why):
                yield block
    for path in sorted(unnamed):
        name = posixpath.relpath(path, folder)
        why = f"image file {name!r} has no line in metadata.jsonl, so no caption"
        if block := blocks.add(posixpath.splitext(name)[0], reason=why):
            yield block
    if block := blocks.flush():
        yield block


def _sidecars(files: dict[str, str], cfg: DataConfig) -> list[str | None]:
    """A stem's (image, caption, JSON) extensions among `files` (extension -> path)."""
    return [_first(IMAGE_EXTS, files), _first(cfg.caption_fields, files), _first(META_FIELDS, files)]


def _folder_row(files: dict[str, str], data: dict[str, bytes | None], cfg: DataConfig) -> tuple:
    """(image, caption, meta, reason) of one stem, from its files' `data`."""
    picks, cap = _sidecars(files, cfg), cfg.max_member_bytes
    image, caption, meta = (data.get(files[e]) if e else None for e in picks)
    for ext, content in zip(picks, (image, caption, meta)):
        if content is not None and len(content) > cap:
            return None, None, None, _too_big(f"file {posixpath.basename(files[ext])!r}", cap)
    if picks[0] is None:
        names = ", ".join(sorted(posixpath.basename(p) for p in files.values()))
        return None, None, None, f"no image file (has: {names})"
    caption, reason = _text(caption)
    meta, _ = _text(meta)
    return image, caption, meta, reason


def read_folder(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    """Images with sidecars of the same stem: `a.jpg` + `a.txt` (+ optional `a.json`). A
    caption or JSON sidecar without an image is a row too, quarantined for it."""
    fs, _ = open_fs(shard.uri, cfg.storage_options)
    by_stem: dict[str, dict[str, str]] = {}
    for path in shard.files:
        stem, ext = posixpath.splitext(path)
        by_stem.setdefault(stem, {})[ext[1:].lower()] = path
    stems = sorted(s for s, files in by_stem.items() if any(_sidecars(files, cfg)))
    blocks, step = RowBlocks(cfg.exec.block_rows), cfg.exec.block_rows
    for start in range(0, len(stems), step):
        chunk = stems[start : start + step]
        wanted = [by_stem[s][e] for s in chunk for e in _sidecars(by_stem[s], cfg) if e]
        data = _read_files(fs, wanted, cfg.max_member_bytes)
        for stem in chunk:
            if block := blocks.add(posixpath.basename(stem), *_folder_row(by_stem[stem], data, cfg)):
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
