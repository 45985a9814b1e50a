"""Scoring on held-out scenes of the embedded corpus, judged by the scene detector:

- generation, GenEval-style: single object, two objects, counting, colours, position,
  colour attribution; overall = the mean of the six category scores;
- understanding: VQA exact-match accuracy on the scenes' question/answer pairs;
- editing: success rate of an instruction applied to a source scene.

The functions here score images and answers; producing them (the model, the tokenizer)
is the caller's business, so the scoring itself is tested against rendered ground truth.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from uniloom.pipelines.corpus.scenes import SceneObject, sample_scene, scene_objects
from uniloom.pipelines.evaluate.detector import attributes_match, detect, relation_holds

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Held-out scenes come from a seed the training corpus never uses.
HELD_OUT_SEED_OFFSET = 1_000_003


@dataclass
class EvalItem:
    key: str
    scene: dict[str, Any]  # sample_scene's ground truth

    @property
    def objects(self) -> list[SceneObject]:
        return scene_objects(self.scene["objects"])


def held_out(seed: int, num: int, max_objects: int = 4, kinds: Sequence[str] | None = None) -> list[EvalItem]:
    """`num` scenes of the requested kinds from the held-out seed, deterministic."""
    items, index = [], 0
    while len(items) < num:
        scene = sample_scene(seed + HELD_OUT_SEED_OFFSET, index, max_objects)
        if kinds is None or scene["kind"] in kinds:
            items.append(EvalItem(f"heldout-{index:06d}", scene))
        index += 1
    return items


def geneval_checks(scene: dict[str, Any], image: np.ndarray) -> dict[str, bool]:
    """The GenEval categories a generated `image` for `scene`'s caption passes or fails."""
    truth = scene_objects(scene["objects"])
    found = detect(image)
    kinds = {(o.shape, o.color) for o in found}
    shapes = {o.shape for o in found}
    kind = scene["kind"]
    if kind == "single":
        (o,) = truth
        return {"single_object": o.shape in shapes, "colors": (o.shape, o.color) in kinds}
    if kind == "pair":
        a, b = truth
        return {
            "two_object": a.shape in shapes and b.shape in shapes,
            "color_attr": (a.shape, a.color) in kinds and (b.shape, b.color) in kinds,
            "position": relation_holds(found, a, b, scene["relation"]),
        }
    if kind == "count":
        o = truth[0]
        return {"counting": sum((d.shape, d.color) == (o.shape, o.color) for d in found) == len(truth)}
    return {"color_attr": attributes_match(found, truth)}


@dataclass
class Scores:
    per_category: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def overall(self) -> float:
        present = [self.per_category[c] for c in CATEGORIES if c in self.per_category]
        return float(np.mean(present)) if present else 0.0


def score_generation(items: Sequence[EvalItem], images: Sequence[np.ndarray]) -> Scores:
    results: dict[str, list[bool]] = defaultdict(list)
    for item, image in zip(items, images, strict=True):
        for category, ok in geneval_checks(item.scene, image).items():
            results[category].append(ok)
    return Scores(
        per_category={c: float(np.mean(v)) for c, v in results.items()},
        counts={c: len(v) for c, v in results.items()},
    )


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().replace("?", " ").replace(".", " ").split())


def score_vqa(answers: Sequence[str], truths: Sequence[str]) -> float:
    if not truths:
        return 0.0
    hits = [normalise_answer(a) == normalise_answer(t) for a, t in zip(answers, truths, strict=True)]
    return float(np.mean(hits))


def edit_succeeded(scene: dict[str, Any], image: np.ndarray) -> bool:
    """The edited image shows the target scene's objects; a move also went the right way."""
    edit = scene["edit"]
    target = scene_objects(edit["objects"])
    found = detect(image)
    if not attributes_match(found, target):
        return False
    if edit["op"] != "move":
        return True
    before = {o.name: o for o in scene_objects(scene["objects"])}
    after = {o.name: o for o in target}
    moved = next(name for name in after if after[name].center != before[name].center)
    direction = edit["instruction"].rsplit(" ", 1)[-1]
    axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[direction]
    candidates = [d for d in found if d.name == moved]
    return any(sign * (d.center[axis] - before[moved].center[axis]) > 0.1 for d in candidates)


def score_edits(items: Sequence[EvalItem], images: Sequence[np.ndarray]) -> float:
    if not items:
        return 0.0
    return float(np.mean([edit_succeeded(i.scene, img) for i, img in zip(items, images, strict=True)]))


def vqa_pairs(items: Sequence[EvalItem]) -> list[tuple[EvalItem, str, str]]:
    return [(item, qa["question"], qa["answer"]) for item in items for qa in item.scene["vqa"]]


def evaluate_all(
    items: Sequence[EvalItem],
    generate_images: Callable[[list[str]], list[np.ndarray]],
    answer: Callable[[list[EvalItem], list[str]], list[str]],
    edit_images: Callable[[list[EvalItem]], list[np.ndarray]],
) -> dict[str, float]:
    """Every score for `items`, with the model behind three callables."""
    gen_items = [i for i in items if i.scene["kind"] in ("single", "pair", "count", "multi")]
    gen = score_generation(gen_items, generate_images([i.scene["caption"] for i in gen_items]))
    pairs = vqa_pairs(items)
    answers = answer([p[0] for p in pairs], [p[1] for p in pairs])
    out = {f"geneval_{c}": v for c, v in gen.per_category.items()}
    out["geneval_overall"] = gen.overall
    out["vqa_accuracy"] = score_vqa(answers, [p[2] for p in pairs])
    out["edit_success"] = score_edits(items, edit_images(list(items)))
    return out
