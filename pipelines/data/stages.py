"""Stage base classes, after datatrove's filter template: a stage works on a whole block
of rows at once (no per-row framework overhead); a filter writes only its predicate.

Rows are never dropped on the way: a rejected row keeps flowing with its status (filtered
or quarantined) and reason, without its pixels. The driver sees every row of a shard, so
it knows when a shard is complete, and its counts are exact by construction:
rows read = written + filtered (per filter) + quarantined. The driver writes the
exclusion records (the quarantine and filtered tables) at commit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

OK, FILTERED, QUARANTINED = 0, 1, 2
# Marker rows: one per shard, after its data rows. END carries the shard's row count;
# ERROR carries the reason the shard could not be read (its rows are then discarded).
END, ERROR = 3, 4


class Batch:
    """One block of rows: the input columns, each row's fate, and columns stages add."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.n = table.num_rows
        self.status = table.column("status").to_numpy(zero_copy_only=False).astype(np.int8)
        self.reason: list[str | None] = table.column("reason").to_pylist()
        self.values: dict[str, Any] = {}
        self._py: dict[str, list] = {}

    def live(self) -> np.ndarray:
        """Indices of the rows still being processed."""
        return np.flatnonzero(self.status == OK)

    def column(self, name: str) -> list:
        """An input column as a Python list (converted once)."""
        if name not in self._py:
            self._py[name] = self.table.column(name).to_pylist()
        return self._py[name]

    def reject(self, idx, status: int, reason: str | list[str]) -> None:
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        self.status[idx] = status
        reasons = [reason] * len(idx) if isinstance(reason, str) else reason
        for i, r in zip(idx.tolist(), reasons):
            self.reason[i] = r


class Stage:
    """Declares its name; `process` sees only the live rows' indices."""

    name = "stage"

    def __call__(self, batch: Batch) -> None:
        idx = batch.live()
        if len(idx):
            self.process(batch, idx)

    def process(self, batch: Batch, idx: np.ndarray) -> None:
        raise NotImplementedError


class Filter(Stage):
    """A filter writes only `keep` (one boolean per live row, vectorised); rows it does
    not keep are marked filtered under the filter's name and counted under it."""

    def process(self, batch: Batch, idx: np.ndarray) -> None:
        keep = np.asarray(self.keep(batch, idx), dtype=bool)
        if keep.shape != idx.shape:
            raise ValueError(f"filter {self.name}: keep() returned {keep.shape}, expected {idx.shape}")
        if not keep.all():
            batch.reject(idx[~keep], FILTERED, self.name)

    def keep(self, batch: Batch, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Quarantine(Exception):
    """Raised for one row by a per-row step: the row is quarantined with this reason."""


class RowStage(Stage):
    """A stage whose work is inherently per row (decoding): `row` returns the row's new
    values or raises Quarantine; the base stores the values and quarantines failures."""

    outputs: tuple[str, ...] = ()

    def process(self, batch: Batch, idx: np.ndarray) -> None:
        columns = {name: batch.values.setdefault(name, [None] * batch.n) for name in self.outputs}
        for i in idx.tolist():
            try:
                values = self.row(batch, i)
            except Quarantine as e:
                batch.reject(i, QUARANTINED, str(e))
                continue
            for name, value in zip(self.outputs, values):
                columns[name][i] = value

    def row(self, batch: Batch, i: int) -> tuple:
        raise NotImplementedError
