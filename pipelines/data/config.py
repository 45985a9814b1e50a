"""The `data:` section of the config. Its own module (no torch, no Ray) so that loading a
config stays cheap; pipelines/config.py holds it as `UniloomConfig.data`.

Everything here except `exec` and `storage_options` decides what the output rows are, so
it is part of every shard's fingerprint; `exec` only decides how fast they are made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class FilterConfig:
    """Which rows to keep. A row failing a filter is counted under the filter's name."""

    min_side: int = 32  # pixels, of the decoded image's shorter side
    max_aspect: float = 3.0  # longer side / shorter side
    min_caption_chars: int = 1
    max_caption_chars: int = 1000
    exact_dedup: bool = True  # by a hash of the decoded pixels, across shards and reruns
    near_dup_bits: int = -1  # perceptual-hash Hamming distance counted as a duplicate; -1: off


@dataclass
class DataExecConfig:
    """How the pipeline runs: excluded from fingerprints, so changing it reprocesses nothing."""

    block_rows: int = 256  # rows per block that a reader emits
    task_cpus: float = 0.5  # logical CPUs per read/decode task (fractional: 2-core machines)
    encode_actors: int = 2  # MingTok actors in the pool, one model load each
    actor_cpus: float = 0.5
    actor_gpus: float = 0.0  # GPUs per actor on clusters
    encode_batch: int = 128  # images per MingTok forward
    torch_threads: int = 1  # intra-op threads per actor (and of the bench's ceiling loop)


def _names(*names: str):
    return field(default_factory=lambda: list(names))


@dataclass
class ColumnsConfig:
    """Where each field of a sample is, first present wins: Parquet and Hugging Face column
    names, webdataset member fields (what follows the key: `{key}.src.jpg` is `src.jpg`),
    sidecar extensions of image folders, and keys of a sample's JSON for edit rounds. The
    layouts they read are described in pipelines/data/fields.py."""

    key: str = "key"  # Parquet/HF column with the sample key; absent: the row index
    image: list[str] = _names("image", "source_image", "src.jpg", "src.jpeg", "src.png", "src.webp",
                              "jpg", "jpeg", "png", "webp")  # fmt: skip
    caption: list[str] = _names("caption", "txt", "text")
    meta: list[str] = _names("json", "meta")  # the sample's JSON (VQA pairs, ground truth, edit rounds)
    # Edits. An instruction is looked for only beside a target, and before the caption.
    instruction: list[str] = _names("instruction", "edit_instruction", "edit_prompt", "txt")
    target: list[str] = _names("edited_image", "target_image", "target", "tgt.jpg", "tgt.jpeg",
                               "tgt.png", "tgt.webp")  # fmt: skip
    rounds: list[str] = _names("edits", "rounds")  # several rounds: [{instruction, target}, ...]


@dataclass
class DataConfig:
    format: Literal["auto", "webdataset", "parquet", "hf", "imagefolder", "folder"] = "auto"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    max_pixels: int = 40_000_000  # decoded images above this are quarantined (decompression bombs)
    # Bytes of one input file or tar member (image, caption, JSON); larger ones are not read
    # and their row is quarantined, so a hostile shard cannot exhaust a reader's memory.
    max_member_bytes: int = 64 << 20
    latent_dtype: Literal["float32", "float16"] = "float32"
    # MingTok encoding in fp32, bf16 autocast, or auto: bf16 on CUDA and on CPUs that run it
    # faster than fp32 (pipelines/precision.py)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    tokenizer_weights: str = ""  # MingTok safetensors from `uniloom tokenizer train`
    text_tokenizer: str = ""  # a byte-level BPE tokenizer.json; empty: train one on the captions
    bpe_vocab_size: int = 4096
    bpe_min_frequency: int = 2
    bpe_max_captions: int = 1_000_000  # captions read to train the BPE
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (endpoint, ...)
    filters: FilterConfig = field(default_factory=FilterConfig)
    exec: DataExecConfig = field(default_factory=DataExecConfig)
