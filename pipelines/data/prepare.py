"""The CPU half of the pipeline, composed from the config: caption filters, decode and
validate, size filters, resize + centre crop, hashes, edit targets, text tokenization.
One call per block; Ray Data fuses it with the MingTok encoder into the actor pool."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.filters import caption_filters, size_filters
from uniloom.pipelines.data.images import EditTargets, Load, Open, ParseMeta, PerceptualHash, ResizeCrop
from uniloom.pipelines.data.schema import CARRIED, fixed_binary, fixed_binary_lists, prepared_schema
from uniloom.pipelines.data.stages import OK, Batch, Stage
from uniloom.pipelines.data.text_tokenizer import TextTokenizerRef, TokenizeText


def build_stages(cfg: DataConfig, image_size: int, text: TextTokenizerRef) -> list[Stage]:
    return [
        *caption_filters(cfg.filters),
        ParseMeta(),
        Open(cfg.max_pixels),
        *size_filters(cfg.filters),
        Load(),
        ResizeCrop(image_size),
        PerceptualHash(),
        EditTargets(image_size, cfg.max_pixels),
        TokenizeText(text),
    ]


class Prepare:
    """map_batches function: source rows (pyarrow) -> prepared rows (pyarrow)."""

    def __init__(self, cfg: DataConfig, image_size: int, text: TextTokenizerRef):
        self.image_size = image_size
        self.stages = build_stages(cfg, image_size, text)
        self.schema = prepared_schema(image_size)

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = Batch(table)
        for stage in self.stages:
            stage(batch)
        return self.to_table(batch)

    def to_table(self, batch: Batch) -> pa.Table:
        n, S, v = batch.n, self.image_size, batch.values
        live = batch.status == OK
        none = [None] * n
        empty = np.zeros((n, S, S, 3), dtype=np.uint8)
        columns = {name: batch.table.column(name) for name in CARRIED}
        columns["status"] = pa.array(batch.status, pa.int8())
        columns["reason"] = pa.array(batch.reason, pa.string())
        columns["width"] = pa.array(
            [w if ok else None for w, ok in zip(v.get("width", none), live)], pa.int32()
        )
        columns["height"] = pa.array(
            [h if ok else None for h, ok in zip(v.get("height", none), live)], pa.int32()
        )
        columns["sha"] = pa.array(
            [s if ok else None for s, ok in zip(v.get("sha", none), live)], pa.binary(16)
        )
        columns["phash"] = pa.array(v.get("phash", np.zeros(n, np.uint64)), pa.uint64())
        columns["pixels"] = fixed_binary(v.get("pixels", empty), live)
        columns["edit_pixels"] = fixed_binary_lists(
            [x if ok else None for x, ok in zip(v.get("edit_pixels", none), live)], pa.binary(S * S * 3)
        )
        for name, field in zip(self.schema.names, self.schema):
            if name not in columns:
                columns[name] = pa.array(
                    [x if ok else None for x, ok in zip(v.get(name, none), live)], field.type
                )
        return pa.table([columns[name] for name in self.schema.names], schema=self.schema)
