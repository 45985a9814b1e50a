"""Global deduplication: exact (hash of the decoded pixels) and near (perceptual hash
within a Hamming distance), across shards and across reruns.

The index holds the hashes of every row the output keeps and which shard owns it; it is
stored beside the manifest as one small table per shard (_index/<shard>.parquet), written
with the shard's commit, so it always describes exactly the committed shards.

Rule: the first committed occurrence wins, and within a run shards commit in id order
(rows in key order), so the result does not depend on task timing and a killed run's
rerun keeps the same rows as a clean run. A shard that lost rows to another records it,
with the owner's index file at the time (`dedup_against` in the manifest); if that owner
is later reprocessed or removed, the planner reprocesses the loser too, so a picture never
disappears with its owner. The recorded index file makes this hold across a kill between
the owner's commit and the loser's: the next run sees the owner's index moved.

A redone shard that fails to read keeps its previous output, but the run deduplicated
the other shards without its hashes (redone shards are not in the index). After the run,
`stale_failures` names the failed shards whose previous output no longer agrees with the
index; the runner withdraws those, and the kept ones' hashes join the index.
"""

from __future__ import annotations

from collections.abc import Callable
from graphlib import TopologicalSorter
from typing import Any

import numpy as np
import pyarrow as pa

from uniloom.pipelines.data.config import FilterConfig
from uniloom.pipelines.data.manifest import moved_owners
from uniloom.pipelines.data.schema import INDEX_SCHEMA

EXACT, NEAR = "exact_dup", "near_dup"
CHUNK = 256  # rows compared against the whole index at once (bounds the XOR matrix)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between uint64 hashes: (len(a), len(b))."""
    return np.bitwise_count(a[:, None] ^ b[None, :])


class DedupIndex:
    def __init__(self, cfg: FilterConfig):
        self.exact = cfg.exact_dedup
        self.near_bits = cfg.near_dup_bits
        self.sha_owner: dict[bytes, str] = {}
        self._phashes: list[np.ndarray] = []
        self._owners: list[str] = []  # one per entry of _phashes
        self._flat: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, shard_id: str, shas: list[bytes], phashes: np.ndarray) -> None:
        for sha in shas:
            self.sha_owner.setdefault(sha, shard_id)
        if len(phashes):
            self._phashes.append(np.asarray(phashes, dtype=np.uint64))
            self._owners.append(shard_id)
            self._flat = None

    def add_table(self, shard_id: str, table: pa.Table) -> None:
        shas = table.column("sha").to_pylist()
        self.add(shard_id, shas, table.column("phash").to_numpy(zero_copy_only=False))

    def _all(self) -> tuple[np.ndarray, np.ndarray]:
        """All indexed perceptual hashes and the index of their owner in _owners."""
        if self._flat is None:
            if self._phashes:
                owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(self._phashes)])
                self._flat = (np.concatenate(self._phashes), owner)
            else:
                self._flat = (np.zeros(0, np.uint64), np.zeros(0, np.int64))
        return self._flat

    def decide(self, shas: list[bytes], phashes: np.ndarray) -> tuple[np.ndarray, list[str | None], set[str]]:
        """For one shard's rows in key order: which to keep, why the others go, and the
        shards that own the pictures they duplicate."""
        n = len(shas)
        keep = np.ones(n, dtype=bool)
        reasons: list[str | None] = [None] * n
        owners: set[str] = set()
        if self.exact:
            seen: set[bytes] = set()
            for i, sha in enumerate(shas):
                owner = self.sha_owner.get(sha)
                if owner is not None or sha in seen:
                    keep[i], reasons[i] = False, EXACT
                    if owner is not None:
                        owners.add(owner)
                seen.add(sha)
        if self.near_bits >= 0 and keep.any():
            self._near(np.asarray(phashes, dtype=np.uint64), keep, reasons, owners)
        return keep, reasons, owners

    def duplicates(self, shas: list[bytes], phashes: np.ndarray) -> int:
        """How many of these rows duplicate a row of the index (not counting each other)."""
        dup = np.zeros(len(shas), dtype=bool)
        if self.exact:
            dup |= np.array([sha in self.sha_owner for sha in shas], dtype=bool)
        index, _ = self._all()
        if self.near_bits >= 0 and len(index):
            phashes = np.asarray(phashes, dtype=np.uint64)
            for start in range(0, len(shas), CHUNK):
                d = hamming(phashes[start : start + CHUNK], index)  # (chunk, index)
                dup[start : start + CHUNK] |= d.min(axis=1) <= self.near_bits
        return int(dup.sum())

    def _near(self, phashes: np.ndarray, keep: np.ndarray, reasons: list, owners: set[str]) -> None:
        index, owner_of = self._all()
        rows = np.flatnonzero(keep)
        if len(index):
            for start in range(0, len(rows), CHUNK):
                chunk = rows[start : start + CHUNK]
                d = hamming(phashes[chunk], index)  # (chunk, index)
                near = d.min(axis=1) <= self.near_bits
                for i, dists in zip(chunk[near], d[near]):
                    keep[i], reasons[i] = False, NEAR
                    owners.add(self._owners[owner_of[int(np.argmin(dists))]])
        kept: list[int] = []  # within the shard: greedy in key order
        for i in np.flatnonzero(keep):
            if kept and hamming(phashes[[i]], phashes[kept]).min() <= self.near_bits:
                keep[i], reasons[i] = False, NEAR
            else:
                kept.append(int(i))


def index_table(keys: list[str], shas: list[bytes], phashes: np.ndarray) -> pa.Table:
    return pa.table(
        {"key": keys, "sha": pa.array(shas, pa.binary(16)), "phash": pa.array(phashes, pa.uint64())},
        schema=INDEX_SCHEMA,
    )


def stale_failures(
    index: DedupIndex,
    entries: dict[str, dict[str, Any]],
    failed: list[str],
    changed: set[str],
    read_index: Callable[[str], pa.Table],
) -> dict[str, str]:
    """After a run: the failed shards (redone, unreadable) whose previous entry in `entries`
    must be withdrawn, with the reason. `index` holds what the run committed against, and
    the done shards; `changed` are the shards it committed or removed.

    A previous output may stay only if the index agrees with it: none of the shards it
    lost duplicates to changed (the pictures it dropped might now have no owner), and none
    of its rows duplicates a row that the run kept without knowing its hashes. Owners are
    settled before the shards that lost to them; a kept output's hashes join `index`."""
    pending = {sid: set(entries[sid].get("dedup_against", [])) for sid in failed if sid in entries}
    order = TopologicalSorter({sid: owners & pending.keys() for sid, owners in pending.items()})
    changed, withdrawn = set(changed), {}
    for sid in order.static_order():
        if owners := sorted(pending[sid] & changed):
            withdrawn[sid] = f"it lost duplicates to {', '.join(owners)}, which changed in this run"
        elif owners := moved_owners(entries[sid], entries):  # in a run killed before this one
            withdrawn[sid] = f"it lost duplicates to {', '.join(owners)}, which changed after its commit"
        else:
            table = read_index(sid)
            shas, phashes = (
                table.column("sha").to_pylist(),
                table.column("phash").to_numpy(zero_copy_only=False),
            )
            if not (n := index.duplicates(shas, phashes)):
                index.add(sid, shas, phashes)
                continue
            withdrawn[sid] = f"{n} of its rows duplicate rows that this run's commits kept without its hashes"
        changed.add(sid)
    return dict(sorted(withdrawn.items()))
