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


def contained(folder: str, name: str) -> str:
    """`folder`/`name` for a relative path read from the data (an imagefolder's file_name, a
    Hugging Face image path). Raises ValueError, saying why, when `name` is empty, absolute,
    a URL, or leads out of `folder` through `..`. Plain posix path arithmetic, so it holds
    for object-store keys as well as local paths."""
    if not name:
        raise ValueError("empty path")
    if "://" in name:
        raise ValueError(f"{name!r} is a URL, not a path inside the dataset")
    if name.startswith("/"):
        raise ValueError(f"{name!r} is an absolute path, not a path inside the dataset")
    base = posixpath.normpath(folder) if folder else ""
    path = posixpath.normpath(posixpath.join(base, name))
    prefix = "" if base in ("", ".") else base.rstrip("/") + "/"
    if not path.startswith(prefix) or path in (base, ".") or path.split("/")[0] == "..":
        raise ValueError(f"{name!r} does not lead to a file inside the dataset folder")
    return path


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
