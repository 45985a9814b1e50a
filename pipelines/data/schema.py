"""Arrow schemas of the rows between stages and of the output shards.

Pixels and latents travel as fixed-size binary columns built straight from NumPy buffers
(no per-row copies); the output stores latents as plain binary with their dtype and shape
recorded per row and in the file's metadata, which every Parquet reader understands.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

IDS = pa.list_(pa.int32())
VQA = pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string())]))

# What a reader emits per row: an edit sample's instructions and target images, one per
# round of its chain (round r's instruction applies to round r - 1's target).
RAW_FIELDS = [
    ("key", pa.string()),
    ("image", pa.binary()),
    ("caption", pa.string()),
    ("meta", pa.string()),
    ("edit_instruction", pa.list_(pa.string())),
    ("edit_images", pa.list_(pa.binary())),
    ("status", pa.int8()),
    ("reason", pa.string()),
]
RAW_SCHEMA = pa.schema(RAW_FIELDS)
# What the read tasks emit: the reader's columns plus the shard and, on the marker row,
# how many rows the shard had.
SOURCE_FIELDS = [("shard", pa.string()), *RAW_FIELDS, ("shard_rows", pa.int64())]
SOURCE_SCHEMA = pa.schema(SOURCE_FIELDS)

# Columns every stage passes along unchanged, then what decoding and tokenizing add.
CARRIED = ["shard", "key", "status", "reason", "shard_rows", "caption", "meta", "edit_instruction"]
TEXT_FIELDS = [
    ("text_ids", IDS),
    ("edit_instruction_ids", pa.list_(IDS)),  # one per round of the edit chain
    ("vqa", VQA),
    ("vqa_question_ids", pa.list_(IDS)),
    ("vqa_answer_ids", pa.list_(IDS)),
]


def prepared_schema(image_size: int) -> pa.Schema:
    pixels = pa.binary(image_size * image_size * 3)
    return pa.schema(
        [f for f in SOURCE_FIELDS if f[0] in CARRIED]
        + [
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("sha", pa.binary(16)),
            ("phash", pa.uint64()),
            ("pixels", pixels),
            ("edit_pixels", pa.list_(pixels)),  # each round's target, cropped like `pixels`
        ]
        + TEXT_FIELDS
    )


def fixed_binary(rows: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(n, ...) array -> fixed-size binary column over the same memory; invalid rows null."""
    rows = np.ascontiguousarray(rows)
    n = rows.shape[0]
    width = rows[0].nbytes if n else int(np.prod(rows.shape[1:], dtype=np.int64)) * rows.itemsize
    validity = None if valid.all() else pa.array(valid, pa.bool_()).buffers()[1]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [validity, pa.py_buffer(rows)])


def fixed_binary_lists(items: list[np.ndarray | None], item: pa.DataType) -> pa.Array:
    """Per-row stacks (R_i, ...) of equal-sized arrays -> list<item> column, one fixed-size
    binary per array along the first axis (an edit chain's rounds); None rows are null."""
    counts = np.array([0 if x is None else len(x) for x in items], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32())
    chunks = [np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in items if x is not None]
    data = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    values = pa.FixedSizeBinaryArray.from_buffers(item, int(counts.sum()), [None, pa.py_buffer(data)])
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array([x is None for x in items], pa.bool_()))


def output_schema(latent_shape: tuple[int, int], latent_dtype: str, image_kind: str = "mingtok") -> pa.Schema:
    """The output shards' columns. Constant columns (shape, dtype, tokenizer fingerprints)
    cost nothing after Parquet's dictionary encoding and survive every reader. `latents`
    holds the image tokenizer kind's values per token (pipelines/tokenizer/kinds.py):
    floats for MingTok and TUNA latents, integers (latent_dtype int16/int32) for UniTok
    codes; the kind is in the file's metadata and in the manifest."""
    meta = {
        b"uniloom.latent_shape": str(list(latent_shape)).encode(),
        b"uniloom.latent_dtype": latent_dtype.encode(),
        b"uniloom.image_kind": image_kind.encode(),
    }
    return pa.schema(
        [
            ("key", pa.string()),
            ("source", pa.string()),
            ("caption", pa.string()),
            ("text_ids", IDS),
            ("latents", pa.binary()),
            ("latent_shape", pa.list_(pa.int32())),
            ("latent_dtype", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("image_size", pa.int32()),
            ("content_hash", pa.string()),
            ("text_tokenizer", pa.string()),
            ("image_tokenizer", pa.string()),
            ("meta", pa.string()),
            ("vqa", VQA),
            ("vqa_question_ids", pa.list_(IDS)),
            ("vqa_answer_ids", pa.list_(IDS)),
            ("edit_instruction", pa.list_(pa.string())),
            ("edit_instruction_ids", pa.list_(IDS)),
            ("edit_latents", pa.list_(pa.binary())),  # round r's target, laid out like `latents`
        ],
        metadata=meta,
    )


REJECTED_SCHEMA = pa.schema([("source", pa.string()), ("key", pa.string()), ("reason", pa.string())])
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("sha", pa.binary(16)), ("phash", pa.uint64())])
