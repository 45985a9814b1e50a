"""fsspec helpers: one filesystem per URL (local paths, s3://, gs://, ...), writes that
appear whole or not at all (write under a temporary name, then rename), and one error for a
store that fails a write.

Object stores retry their own requests: s3fs, under botocore's retries of server errors,
throttling and dropped connections, retries again with backoff (measured against moto:
a PUT failing with 500 is tried 5 times in about 5 s, one failing with 503 SlowDown 25 times
in about 40 s). uniloom adds no retry loop of its own above theirs; what still fails after
them, like a full disk, becomes `store_error`: one line naming the file."""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator
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
        os.replace(src, dst)
    else:
        fs.mv(src, dst)


@contextlib.contextmanager
def store_error(fs, action: str, path: str, tmp: str | None = None) -> Iterator[None]:
    """Whatever the store raises inside (ENOSPC, EFBIG, an object store still failing after
    its client's retries) becomes one UniloomError naming the file. Only the store's calls
    run inside, so what they raise is the store's fault, whatever its class (s3fs raises
    botocore's errors for dropped connections). `tmp`, a partial temporary file, is removed
    so that a full disk gets its space back."""
    try:
        yield
    except Exception as e:
        if tmp is not None:
            with contextlib.suppress(Exception):
                fs.rm_file(tmp)
        raise UniloomError(
            f"cannot {action} {to_uri(fs, path)} ({e.__class__.__name__}: {e}); the output keeps its "
            "last committed state: rerun when the store works again"
        ) from e


def write_atomic(fs, root: str, path: str, data: bytes) -> None:
    tmp = tmp_path(root, posixpath.splitext(path)[1])
    with store_error(fs, "write", path, tmp):
        fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        replace(fs, tmp, path)
