"""The Ray Data datasource: one read task per input shard, each ending with a marker row
that tells the driver the shard is complete (END, with its row count) or failed (ERROR,
with the reason naming the shard). A failing shard never fails the dataset."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.readers import InputShard, ShardError, read_shard
from uniloom.pipelines.data.schema import SOURCE_SCHEMA
from uniloom.pipelines.data.stages import END, ERROR


def _with_shard(block: pa.Table, shard_id: str) -> pa.Table:
    n = block.num_rows
    block = block.append_column("shard", pa.array([shard_id] * n, pa.string()))
    block = block.append_column("shard_rows", pa.nulls(n, pa.int64()))
    return block.select(SOURCE_SCHEMA.names)


def marker(shard_id: str, status: int, rows: int, reason: str | None = None) -> pa.Table:
    values = {name: [None] for name in SOURCE_SCHEMA.names}
    values.update(shard=[shard_id], status=[status], reason=[reason], shard_rows=[rows])
    return pa.table(values, schema=SOURCE_SCHEMA)


def read_marked(shard: InputShard, cfg: DataConfig) -> Iterator[pa.Table]:
    rows = 0
    try:
        for block in read_shard(shard, cfg):
            rows += block.num_rows
            yield _with_shard(block, shard.id)
    except ShardError as e:
        yield marker(shard.id, ERROR, rows, f"{shard.uri}: {e}")
        return
    except Exception as e:  # network, permissions, corrupt compression: this shard only
        yield marker(shard.id, ERROR, rows, f"{shard.uri}: cannot be read ({e.__class__.__name__}: {e})")
        return
    yield marker(shard.id, END, rows)


class ShardSource(Datasource):
    def __init__(self, shards: list[InputShard], cfg: DataConfig):
        super().__init__()
        self.shards, self.cfg = shards, cfg

    def estimate_inmemory_data_size(self) -> int:
        return sum(s.size for s in self.shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(read_marked, shard, self.cfg),
                BlockMetadata(num_rows=None, size_bytes=shard.size, input_files=[shard.uri], exec_stats=None),
                schema=SOURCE_SCHEMA,
            )
            for shard in self.shards
        ]
