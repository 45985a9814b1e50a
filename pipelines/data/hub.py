"""Hugging Face datasets by name: `--input hf://NAME[:split]` (split `train` when omitted).

NAME is whatever `datasets.load_dataset` takes: a Hub id (`user/name`; offline, with
HF_HUB_OFFLINE=1, the copy an earlier load left in the datasets cache) or a local folder laid
out as a Hub dataset repository (data files, optionally a README with its configs).
`save_to_disk` folders are read as files instead (format `hf`, pipelines/data/readers.py).

The split is streamed (`streaming=True`): nothing is downloaded or converted up front, and
each of the stream's shards (one per data file, as `datasets` splits it) is one input shard,
read by its own task. A shard's content stamp is the dataset builder's hash, which moves
when a data file does (the Hub commit, a local file's modification time), with the shard's
place in the split, so a rerun redoes the split's shards only when the dataset changed.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Iterator

import pyarrow as pa

PREFIX = "hf://"
PART = re.compile(r"(\d+)-of-(\d+)$")


class HubError(Exception):
    """The dataset cannot be opened: the message names it and says what `datasets` said."""


def is_hub(uri: str) -> bool:
    return uri.startswith(PREFIX)


def parse(uri: str) -> tuple[str, str]:
    """`hf://NAME[:split]` -> (NAME, split)."""
    name, sep, split = uri[len(PREFIX) :].rpartition(":")
    if not sep or "/" in split:  # no split given (a colon inside NAME is not one)
        name, split = uri[len(PREFIX) :], "train"
    if not name:
        raise HubError(f"{uri}: no dataset name (expected hf://NAME[:split])")
    return name, split


def absolute(uri: str) -> str:
    """`uri` with a local folder's NAME made absolute (as `load_dataset`, a folder that
    exists wins over a Hub id), so the manifest's record reads the same from any folder."""
    name, split = parse(uri)
    return f"{PREFIX}{os.path.abspath(name)}:{split}" if os.path.isdir(name) else uri


def _stream(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # not found, offline without a cached copy, a bad split: datasets' own types
        raise HubError(
            f"{PREFIX}{name}:{split}: cannot load the dataset ({e.__class__.__name__}: {e})"
        ) from None


def _builder_hash(name: str) -> str:
    """The dataset builder's hash: it moves with the data files (Hub commit, local mtimes)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(name)
    except Exception as e:  # as in _stream
        raise HubError(f"{PREFIX}{name}: cannot load the dataset ({e.__class__.__name__}: {e})") from None
    return f"{builder.config_id}:{builder.hash}"


def list_parts(uri: str) -> list[tuple[str, str]]:
    """(name, content stamp) of each of the split's stream shards; names are
    `<split>-<i>-of-<n>`."""
    name, split = parse(uri)
    n = _stream(name, split).num_shards
    dataset = _builder_hash(name)
    parts = [f"{split}-{i:05d}-of-{n:05d}" for i in range(n)]
    return [(p, hashlib.blake2b(f"{dataset}\0{p}".encode(), digest_size=16).hexdigest()) for p in parts]


def shard_tables(uri: str, part: str, rows: int) -> tuple[list[str], Iterator[pa.Table]]:
    """(column names, Arrow tables of `rows` rows) of one stream shard. Arrow format keeps
    each image as the Image feature stores it ({bytes, path}), undecoded."""
    name, split = parse(uri)
    i, n = (int(x) for x in PART.search(part).groups())
    ds = _stream(name, split)
    if ds.num_shards != n:
        raise HubError(f"{uri}: now has {ds.num_shards} shards, not the {n} it had when listed; rerun")
    ds = ds.shard(num_shards=n, index=i)
    tables = ds.with_format("arrow").iter(batch_size=rows)
    if ds.features is not None:
        return list(ds.features), tables
    head = next(tables, None)  # features unknown until read (JSON lines, say)
    return ([], iter(())) if head is None else (head.column_names, itertools.chain([head], tables))
