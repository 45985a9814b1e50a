"""fsspec helpers: one filesystem per URL (local paths, s3://, gs://, ...) and writes that
appear whole or not at all: write under a temporary name, then rename."""

from __future__ import annotations

import posixpath
import uuid
from typing import Any

import fsspec

from uniloom.pipelines.errors import UniloomError


def open_fs(uri: str, storage_options: dict[str, Any] | None = None):
    """(filesystem, path inside it) for `uri`."""
    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise UniloomError(f"cannot open {uri}: {e}") from None


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def to_uri(fs, path: str) -> str:
    """The URL users recognise: plain paths for local files, `proto://...` otherwise."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def tmp_path(root: str, suffix: str) -> str:
    """A fresh name under `root`/_tmp, on the same filesystem as the final place."""
    return join(root, "_tmp", f"{uuid.uuid4().hex}{suffix}")


def replace(fs, src: str, dst: str) -> None:
    """Move `src` over `dst`: atomic on local disks (rename); on object stores each object
    is written whole, and the manifest written afterwards is what commits."""
    if is_local(fs):
        import os

        os.replace(src, dst)
    else:
        fs.mv(src, dst)


def write_atomic(fs, root: str, path: str, data: bytes) -> None:
    tmp = tmp_path(root, posixpath.splitext(path)[1])
    fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    replace(fs, tmp, path)
