"""Evaluate an exported unified model on held-out scenes: generation (GenEval-style),
VQA and editing, scored by pipelines/evaluate/benchmark.py with the scene detector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.evaluate.benchmark import EvalItem, evaluate_all, held_out
from uniloom.pipelines.evaluate.config import EvalConfig


@dataclass
class Bundle:
    """What inference needs: the unified model, its MingTok, and the text BPE."""

    model: Any
    tokenizer: Any
    text: Any  # tokenizers.Tokenizer
    metadata: dict[str, Any]

    def encode(self, text: str) -> list[int]:
        return self.text.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        from uniloom.models.special_tokens import SPECIAL_IDS

        return self.text.decode([i for i in ids if i >= len(SPECIAL_IDS)])


def load_bundle(export: str, shards: str, storage_options: dict | None = None) -> Bundle:
    from uniloom.pipelines.train.registry import load_export
    from uniloom.pipelines.train.trainer import text_tokenizer

    model, tokenizer, metadata = load_export(export)
    return Bundle(model, tokenizer, text_tokenizer(shards, storage_options or {}), metadata)


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _unit(images: list[np.ndarray]):
    from uniloom.pipelines.tokenizer.data import to_unit

    return to_unit(np.stack(images).transpose(0, 3, 1, 2))


def evaluate_bundle(
    bundle: Bundle, e: EvalConfig, corpus_seed: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Scores and a few sample images (name -> H x W x 3 uint8 grid) for MLflow."""
    import torch

    from uniloom.models.generation import edit, generate, generate_text
    from uniloom.pipelines.tokenizer.data import to_uint8

    size = bundle.tokenizer.cfg.image_size
    gen = torch.Generator().manual_seed(e.seed)
    sampling = {"steps": e.flow_steps or None, "guidance": e.guidance, "generator": gen}
    samples: dict[str, list[np.ndarray]] = {"generation": [], "editing": []}

    def render_scene(objects) -> np.ndarray:
        from uniloom.pipelines.corpus.scenes import scene_objects

        return np.asarray(render(scene_objects(objects), size))

    @torch.no_grad()
    def generate_images(captions: list[str]) -> list[np.ndarray]:
        out = []
        for chunk in _batches(captions, e.batch):
            turn = generate(bundle.model, bundle.tokenizer, [bundle.encode(c) for c in chunk], **sampling)
            out.extend(to_uint8(turn.images))
        samples["generation"] = out[:8]
        return out

    @torch.no_grad()
    def answer(items: list[EvalItem], questions: list[str]) -> list[str]:
        out = []
        for chunk in _batches(list(zip(items, questions, strict=True)), e.batch):
            images = _unit([render_scene(i.scene["objects"]) for i, _ in chunk])
            turn = generate_text(bundle.model, [bundle.encode(q) for _, q in chunk],
                                 tokenizer=bundle.tokenizer, images=images, max_new_tokens=8)  # fmt: skip
            out.extend(bundle.decode(ids) for ids in turn.ids)
        return out

    @torch.no_grad()
    def edit_images(items: list[EvalItem]) -> list[np.ndarray]:
        out = []
        for chunk in _batches(items, e.batch):
            sources = _unit([render_scene(i.scene["objects"]) for i in chunk])
            ids = [bundle.encode(i.scene["edit"]["instruction"]) for i in chunk]
            turn = edit(bundle.model, bundle.tokenizer, None, ids, source_images=sources, **sampling)
            out.extend(to_uint8(turn.images))
        samples["editing"] = out[:8]
        return out

    items = held_out(corpus_seed, e.scenes)
    scores = evaluate_all(items, generate_images, answer, edit_images)
    grids = {name: np.concatenate(images, axis=1) for name, images in samples.items() if images}
    return scores, grids


def gate_passes(scores: dict[str, float], gate: dict[str, float]) -> tuple[bool, list[str]]:
    """Whether every gated metric reaches its minimum; the failures, named."""
    failures = [
        f"{k} {scores.get(k, float('nan')):.3f} < {v}" for k, v in gate.items() if not scores.get(k, -1) >= v
    ]
    return not failures, failures
