"""The one tar reader, on webdataset's conventions, for every stage that reads tars (the
data stage's readers, the tokenizer's training set and its held-out images).

A sample is the members that share a key. The key is the member's path up to the first dot
of its file name and the rest, lower-cased, is the field: `a/b.src.jpg` is field `src.jpg`
of sample `a/b`, as webdataset (`base_plus_ext`, `group_by_keys`) and img2dataset read and
write them. Unlike webdataset's iterator, a sample's members need not be adjacent: every
member is grouped by key before a sample is handed out, so an unsorted tar reads the same.

Input is untrusted: nothing is extracted to disk, and a link, a device, a name leading
outside the archive or a member over the size cap is not read. Its sample comes back
refused, with the reason, so the caller can quarantine it or name it in an error.
"""

from __future__ import annotations

import gzip
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

MEMBER_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}


class TarError(Exception):
    """The file is not a readable tar: the message says what the tar library found."""


@dataclass
class TarSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # field ("png", "src.jpg") -> bytes
    refused: str | None = None  # why the sample is not to be used (its first refused member)


def split_name(name: str) -> tuple[str, str]:
    """(key, field) of a member name. A name without a dot is a sample of its own with an
    empty field (webdataset skips it; here it is reported, never dropped unseen)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def refused_member(member: tarfile.TarInfo, cap: int) -> str | None:
    """Why a member is not read, or None."""
    name = member.name
    if not member.isfile():
        kind = MEMBER_KINDS.get(member.type, f"of tar type {member.type!r}")
        return f"member {name!r} is {kind}, which is not followed"
    if name.startswith("/") or ".." in name.split("/"):
        return f"member name {name!r} leads outside the archive"
    if member.size > cap:
        return f"member {name!r} ({member.size} bytes) is larger than max_member_bytes ({cap} bytes)"
    return None


def read_samples(f: BinaryIO, cap: int = 1 << 62) -> list[TarSample]:
    """Every sample of the tar streamed from `f`, sorted by key. Raises TarError for a file
    that is not a tar (or a truncated one); the stream's own OSErrors pass through."""
    samples: dict[str, TarSample] = {}
    try:
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                key, ext = split_name(member.name)
                sample = samples.setdefault(key, TarSample(key))
                if why := refused_member(member, cap):
                    sample.refused = sample.refused or why
                else:
                    sample.members[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, gzip.BadGzipFile) as e:
        raise TarError(f"not a readable tar ({e.__class__.__name__}: {e})") from None
    return [samples[k] for k in sorted(samples)]


def read_tar_file(path: str, cap: int = 1 << 62) -> list[TarSample]:
    """`read_samples` of a local tar file."""
    with open(path, "rb") as f:
        return read_samples(f, cap)
