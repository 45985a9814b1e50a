"""Where a run keeps its shared state: a local folder (the embedded default) or any fsspec
URL, `s3://bucket/prefix` on a cluster whose nodes share no disk. Every stage reads and
writes its outputs through `workspace_uri`; what stays on one node (logs, caches) goes
under `scratch`, which is the workspace itself when that is a local folder.
"""

from __future__ import annotations

import hashlib
import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec

from uniloom.pipelines.config import UniloomConfig
from uniloom.pipelines.data.fs import is_local, open_fs, store_error


def is_remote(uri: str) -> bool:
    """A URL of a store other than this node's files (`file://` and plain paths are local)."""
    return fsspec.utils.get_protocol(uri) not in ("file", "local")


def workspace_uri(cfg: UniloomConfig, *parts: str) -> str:
    """`parts` under the workspace: an absolute local path, or a URL on its store."""
    if is_remote(cfg.workspace):
        return posixpath.join(cfg.workspace.rstrip("/"), *parts)
    return str(Path(cfg.workspace.removeprefix("file://")).resolve().joinpath(*parts))


def scratch(cfg: UniloomConfig, *parts: str) -> Path:
    """`parts` under this node's own folder for the workspace: logs and caches, never
    shared state. A remote workspace gets one under the temp folder, named after its URL."""
    if not is_remote(cfg.workspace):
        return Path(workspace_uri(cfg)).joinpath(*parts)
    name = hashlib.sha256(cfg.workspace.rstrip("/").encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir(), f"uniloom-{name}", *parts)


def local_for(cfg: UniloomConfig, uri: str) -> Path:
    """Where this node writes a file bound for `uri`: `uri` itself when it is local, else
    a scratch file that `publish` then stores at `uri`."""
    if not is_remote(uri):
        return Path(uri)
    return scratch(cfg, "staging", hashlib.sha256(uri.encode()).hexdigest()[:12], posixpath.basename(uri))


def publish(cfg: UniloomConfig, local: Path, uri: str) -> str:
    """Store `local` (from `local_for`) at `uri` when that is remote; returns `uri`."""
    if is_remote(uri):
        fs, path = open_fs(uri, cfg.data.storage_options)
        with store_error(fs, "write", path):
            fs.put_file(str(local), path)
    return uri


def fetch(cfg: UniloomConfig, uri: str) -> Path:
    """A local copy of the file at `uri` (`uri` itself when it is local), for readers that
    take a path (safetensors)."""
    local = local_for(cfg, uri)
    if is_remote(uri):
        fs, path = open_fs(uri, cfg.data.storage_options)
        local.parent.mkdir(parents=True, exist_ok=True)
        with store_error(fs, "read", path):
            fs.get_file(path, str(local))
    return local


@contextmanager
def staging(cfg: UniloomConfig, uri: str) -> Iterator[Path]:
    """`local_for(cfg, uri)` for the block; on a remote workspace the scratch copy is gone
    after it (publish it inside the block), so nodes do not keep every file they wrote."""
    local = local_for(cfg, uri)
    try:
        yield local
    finally:
        if is_remote(uri):
            local.unlink(missing_ok=True)


@contextmanager
def fetched(cfg: UniloomConfig, uri: str) -> Iterator[Path]:
    """`fetch(cfg, uri)` for the block; a copy fetched from a remote store is removed after."""
    local = fetch(cfg, uri)
    try:
        yield local
    finally:
        if is_remote(uri):
            local.unlink(missing_ok=True)


def ray_storage(uri: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    """(pyarrow filesystem or None for a local path, path in it): Ray Train's
    `storage_filesystem` and `storage_path` for `uri`, so every node reaches its checkpoints."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = open_fs(uri, storage_options)
    return (None, uri) if is_local(fs) else (PyFileSystem(FSSpecHandler(fs)), path)
