"""Finding the input shards under one or more URLs, and the content hash of each shard
(the input part of its fingerprint).

Hashing content is the cost of a rerun, so each shard also gets a metadata key from what
the listing already returned (per file: size, mtime, ctime and inode for local files;
ETag, version id or generation for object stores). The manifest keeps the key beside the
content hash; a rerun hashes only the shards whose key moved, and reuses the recorded hash
for the rest. Like make and rsync, this trusts that content does not change without its
metadata moving (ctime cannot be set back by users, so a restored mtime is still seen).
A file system whose listing has none of these hashes every time. A Hugging Face dataset
named by `hf://NAME[:split]` is listed by `datasets` instead (pipelines/data/hub.py): one
shard per stream shard, its stamp the dataset builder's hash.

Some files under an input are left out on purpose: paths with a component starting with
`.` or `_` (hidden files, the `_SUCCESS`/`_temporary` of Spark and pyarrow, our own output
folders), and data files that belong to no shard of the input's format (a Parquet file
among webdataset tars, an image outside every imagefolder). Each is counted by reason and
logged, and the run summary reports the counts as `skipped_paths`.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from uniloom.pipelines.data import hub
from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.fs import open_fs, to_uri
from uniloom.pipelines.data.manifest import input_meta
from uniloom.pipelines.data.readers import IMAGE_EXTS, InputShard
from uniloom.pipelines.errors import UniloomError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
HIDDEN = "hidden: a path component starts with '.' or '_'"
log = logging.getLogger(__name__)


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1][1:].lower()


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _data_like(path: str) -> bool:
    """A file some input format would read: worth reporting when no shard takes it."""
    return (
        path.endswith((*TAR_SUFFIXES, ".parquet", ".arrow"))
        or _ext(path) in IMAGE_EXTS
        or posixpath.basename(path) == "metadata.jsonl"
    )


def detect(files: list[str], uri: str) -> str:
    names = {posixpath.basename(p) for p in files}
    if "metadata.jsonl" in names:
        return "imagefolder"
    if any(p.endswith(TAR_SUFFIXES) for p in files):
        return "webdataset"
    if any(p.endswith(".arrow") for p in files):
        return "hf"
    if any(p.endswith(".parquet") for p in files):
        return "parquet"
    if any(_ext(p) in IMAGE_EXTS for p in files):
        return "folder"
    raise UniloomError(
        f"no input shards under {uri}: expected webdataset tars, Parquet files, a Hugging Face "
        "dataset folder, an imagefolder with metadata.jsonl, or images with .txt captions"
    )


def _file_shards(suffixes: tuple[str, ...], skip: Callable[[str], bool] = lambda name: False):
    """One shard per file with one of `suffixes`."""

    def split(files: dict[str, dict], root: str) -> list[tuple[str, str, list[str]]]:
        return [
            (posixpath.relpath(p, root), p, [p])
            for p in sorted(files)
            if p.endswith(suffixes) and not skip(posixpath.basename(p))
        ]

    return split


def _imagefolder_shards(files: dict[str, dict], root: str):
    """One shard per folder with a metadata.jsonl: it and the images below it, each image
    in the shard of its nearest such folder (as Hugging Face's imagefolder reads them)."""
    folders = {posixpath.dirname(p) for p in files if posixpath.basename(p) == "metadata.jsonl"}
    members: dict[str, list[str]] = {f: [posixpath.join(f, "metadata.jsonl")] for f in folders}
    for p in sorted(files):
        if _ext(p) not in IMAGE_EXTS:
            continue
        folder = posixpath.dirname(p)
        while folder not in folders and folder not in (root, posixpath.dirname(folder)):
            folder = posixpath.dirname(folder)
        if folder in folders:
            members[folder].append(p)
    return [(posixpath.relpath(f, root), f, sorted(members[f])) for f in sorted(folders)]


def _folder_shards(files: dict[str, dict], root: str):
    by_dir: dict[str, list[str]] = {}
    for p in sorted(files):
        by_dir.setdefault(posixpath.dirname(p), []).append(p)
    return [
        (posixpath.relpath(d, root), d, members)
        for d, members in sorted(by_dir.items())
        if any(_ext(p) in IMAGE_EXTS for p in members)
    ]


SPLITTERS = {
    "webdataset": _file_shards(TAR_SUFFIXES),
    "parquet": _file_shards((".parquet",)),
    "hf": _file_shards((".arrow",), skip=lambda name: name.startswith("cache-")),
    "imagefolder": _imagefolder_shards,
    "folder": _folder_shards,
}


def _skip(skipped: Counter, uri: str, reason: str, paths: list[str]) -> None:
    if paths:
        skipped[reason] += len(paths)
        examples = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        log.warning("input %s: skipped %d path(s), %s (%s)", uri, len(paths), reason, examples)


def input_uri(uri: str, storage_options: dict) -> str:
    """An input as the manifest records it: absolute, so a rerun from elsewhere finds it."""
    return hub.absolute(uri) if hub.is_hub(uri) else to_uri(*open_fs(uri, storage_options))


def _hub_shards(uri: str, prefix: str) -> list[InputShard]:
    uri = hub.absolute(uri)  # read tasks may run in another folder
    try:
        listed = hub.list_parts(uri)
    except hub.HubError as e:
        raise UniloomError(f"input {e}") from None
    return [
        InputShard(
            posixpath.join(prefix, part) if prefix else part, uri, "hub", (part,), 0, (stamp,), (stamp,)
        )
        for part, stamp in listed
    ]


def _add(shards: dict[str, InputShard], shard: InputShard) -> None:
    if shard.id in shards:
        raise UniloomError(f"two inputs have a shard named {shard.id}; give the inputs distinct names")
    shards[shard.id] = shard


def discover(inputs: list[str], cfg: DataConfig, skipped: Counter | None = None) -> list[InputShard]:
    """Every input shard under `inputs`, sorted by id. Ids are paths relative to their
    input (prefixed by the input's name when there are several), so they stay stable.
    Files left out are counted into `skipped` by reason, and logged."""
    skipped = Counter() if skipped is None else skipped
    shards: dict[str, InputShard] = {}
    for uri in inputs:
        if hub.is_hub(uri):
            prefix = hub.parse(uri)[0].rstrip("/").rpartition("/")[2] if len(inputs) > 1 else ""
            for shard in _hub_shards(uri, prefix):
                _add(shards, shard)
            continue
        fs, path = open_fs(uri, cfg.storage_options)
        path = path.rstrip("/") or path
        if not fs.exists(path):
            raise UniloomError(f"input {uri} does not exist")
        if fs.isfile(path):  # named by the user: read whatever its name
            root, infos = posixpath.dirname(path), {path: fs.info(path)}
        else:
            root, infos = path, fs.find(path, detail=True)
            hidden = sorted(p for p in infos if _hidden(posixpath.relpath(p, root)))
            _skip(skipped, uri, HIDDEN, [posixpath.relpath(p, root) for p in hidden])
            infos = {p: i for p, i in infos.items() if not _hidden(posixpath.relpath(p, root))}
        fmt = cfg.format if cfg.format != "auto" else detect(list(infos), uri)
        prefix = posixpath.basename(root) if len(inputs) > 1 else ""
        found = SPLITTERS[fmt](infos, root)
        if not found:
            raise UniloomError(f"no {fmt} shards under {uri}")
        used = {m for _, _, members in found for m in members}
        unused = [posixpath.relpath(p, root) for p in sorted(infos) if p not in used and _data_like(p)]
        _skip(skipped, uri, f"not part of any {fmt} shard", unused)
        for rel, where, members in found:
            sid = posixpath.join(prefix, rel) if prefix else rel
            stamps = tuple(_stamp(infos[m]) for m in members)
            meta = tuple(_meta(infos[m]) for m in members)
            size = sum(int(infos[m].get("size") or 0) for m in members)
            _add(shards, InputShard(sid, to_uri(fs, where), fmt, tuple(members), size, stamps, meta))
    return [shards[k] for k in sorted(shards)]


def _stamp(info: dict) -> str:
    """A content hash the store already has (S3 ETag, GCS md5), or '' to hash ourselves."""
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}:{info.get('size')}"
    return ""


# Listing fields that move when a file's content may have: local (fsspec's `created` is
# st_ctime), S3, GCS, Azure.
META_KEYS = ("mtime", "created", "ino", "ETag", "etag", "VersionId", "md5Hash", "generation", "LastModified",
             "last_modified", "updated")  # fmt: skip


def _meta(info: dict) -> str:
    """A file's metadata from its listing, or '' when the listing has none to rely on."""
    parts = [f"{k}={info[k]}" for k in META_KEYS if info.get(k) not in (None, "")]
    return f"size={info.get('size')};" + ";".join(parts) if parts else ""


def _relpaths(fs, shard: InputShard) -> list[str]:
    base = posixpath.dirname(shard.files[0]) if len(shard.files) == 1 else fs._strip_protocol(shard.uri)
    return [posixpath.relpath(path, base) for path in shard.files]


def content_hash(shard: InputShard, storage_options: dict) -> str:
    if shard.format == "hub":  # listed by `datasets`, not a file system
        return shard.stamps[0]
    fs, _ = open_fs(shard.uri, storage_options)
    h = hashlib.blake2b(digest_size=16)
    for path, rel, stamp in zip(shard.files, _relpaths(fs, shard), shard.stamps):
        h.update(f"{rel}\0{stamp}\0".encode())
        if not stamp:
            with fs.open(path, "rb", block_size=8 << 20) as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
    return h.hexdigest()


def content_hashes(
    shards: list[InputShard],
    storage_options: dict,
    recorded: dict[str, dict] | None = None,
    threads: int = 8,
) -> dict[str, str]:
    """Each shard's content hash: the one in its `recorded` manifest entry when the entry's
    metadata key equals the shard's (nothing read), else hashed, several at once (hashlib
    releases the GIL; object stores are I/O)."""
    recorded = recorded or {}
    out: dict[str, str] = {}
    fresh = []
    for s in shards:
        entry, key = recorded.get(s.id) or {}, input_meta(s)
        if key and entry.get("input_meta") == key and entry.get("input_hash"):
            out[s.id] = entry["input_hash"]
        else:
            fresh.append(s)
    if fresh:
        with ThreadPoolExecutor(threads) as pool:
            out.update(
                zip((s.id for s in fresh), pool.map(lambda s: content_hash(s, storage_options), fresh))
            )
    return {s.id: out[s.id] for s in shards}
