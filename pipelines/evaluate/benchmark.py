"""Scoring on held-out scenes of the embedded corpus, judged by the scene detector:

- generation, GenEval-style: single object, two objects, counting, colours, position,
  colour attribution; overall = the mean of the six category scores;
- understanding: VQA exact-match accuracy over every question/answer pair of every scene;
- editing: success after 1, 2 and 3 chained rounds (see `score_edit_chains`).

Every proportion comes with its n and a 95% Wilson interval; the overall GenEval score,
a mean of correlated categories (one scene feeds several), gets a percentile bootstrap
interval over scenes instead.

The functions here score images and answers; producing them (the model, the tokenizer)
is the caller's business, so the scoring itself is tested against rendered ground truth.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from uniloom.pipelines.corpus.scenes import SceneObject, sample_scene, scene_objects
from uniloom.pipelines.evaluate.detector import (
    attributes_match,
    detect,
    match,
    relation_holds,
)

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Held-out scenes come from seeds the training corpus (seed s) never uses: the test split
# from s + 1_000_003 (the scenes every earlier evaluation used), validation from its own.
SPLIT_SEED_OFFSETS = {"test": 1_000_003, "val": 2_000_029}
Z95 = 1.959964
BOOTSTRAP_RESAMPLES = 2000
EXAMPLES_PER_CATEGORY = 8
MOVE_MIN_DISTANCE = 0.1  # a moved object's centre shifts at least this far the right way
_DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}


@dataclass
class EvalItem:
    key: str
    scene: dict[str, Any]  # sample_scene's ground truth

    @property
    def objects(self) -> list[SceneObject]:
        return scene_objects(self.scene["objects"])


def held_out(
    seed: int, num: int, max_objects: int = 4, kinds: Sequence[str] | None = None, split: str = "test"
) -> list[EvalItem]:
    """`num` scenes of the requested kinds from `split` ("val" or "test") of corpus
    seed `seed`, deterministic."""
    split_seed = seed + SPLIT_SEED_OFFSETS[split]
    items, index = [], 0
    while len(items) < num:
        scene = sample_scene(split_seed, index, max_objects)
        if kinds is None or scene["kind"] in kinds:
            items.append(EvalItem(f"{split}-{index:06d}", scene))
        index += 1
    return items


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials: unlike p +- z*se it stays in
    [0, 1] and does not collapse to a point at 0/n or n/n. It holds k/n; the clamps to
    k/n only undo rounding (at 0/n the lower end came out 3e-17, not 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


@dataclass(frozen=True)
class Proportion:
    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else 0.0

    def metrics(self, name: str) -> dict[str, float]:
        lo, hi = wilson(self.k, self.n)
        return {name: self.value, f"{name}_n": float(self.n), f"{name}_lo": lo, f"{name}_hi": hi}


def proportion(hits: Sequence[bool]) -> Proportion:
    return Proportion(int(sum(hits)), len(hits))


def _distinct_matches(found: list[SceneObject], wanted: list[SceneObject], same) -> bool:
    """Whether every wanted object has its own detection (no detection used twice)."""
    if len(found) < len(wanted):
        return False
    options = [[i for i, d in enumerate(found) if same(d, w)] for w in wanted]

    def assign(j: int, used: frozenset) -> bool:
        return j == len(wanted) or any(assign(j + 1, used | {i}) for i in options[j] if i not in used)

    return assign(0, frozenset())


def geneval_checks(scene: dict[str, Any], image: np.ndarray) -> dict[str, bool]:
    """The GenEval categories a generated `image` for `scene`'s caption passes or fails.

    Stricter than GenEval, whose learned detector's confidence threshold discards clutter:
    the prompt names every object of its scene, so an image passes only when the detector
    finds exactly that many objects. Scattered fragments, each a small "object", otherwise
    pass single_object and two_object by chance (15 fragments of a 16-step model once
    passed "one yellow square"). `two_object` needs one detection per object: a lone
    circle does not pass "a red circle left of a blue circle"."""
    truth = scene_objects(scene["objects"])
    found = detect(image)
    exact = len(found) == len(truth)
    kinds = {(o.shape, o.color) for o in found}
    kind = scene["kind"]
    if kind == "single":
        (o,) = truth
        return {"single_object": exact and o.shape in {d.shape for d in found},
                "colors": exact and (o.shape, o.color) in kinds}  # fmt: skip
    if kind == "pair":
        a, b = truth
        return {
            "two_object": exact and _distinct_matches(found, [a, b], lambda d, w: d.shape == w.shape),
            "color_attr": exact and attributes_match(found, truth),
            "position": exact and relation_holds(found, a, b, scene["relation"]),
        }
    if kind == "count":
        o = truth[0]
        return {"counting": exact and all((d.shape, d.color) == (o.shape, o.color) for d in found)}
    return {"color_attr": attributes_match(found, truth)}


@dataclass
class GenerationScores:
    per_category: dict[str, Proportion] = field(default_factory=dict)
    # scene -> category -> pass, for the bootstrap over scenes
    per_scene: list[dict[str, bool]] = field(default_factory=list)

    @property
    def overall(self) -> float:
        present = [self.per_category[c].value for c in CATEGORIES if c in self.per_category]
        return float(np.mean(present)) if present else 0.0

    def overall_interval(self, seed: int = 0) -> tuple[float, float]:
        """2.5th and 97.5th percentiles of the overall score over scenes resampled with
        replacement (categories absent from a resample count as absent)."""
        if not self.per_scene:
            return 0.0, 1.0
        cats = [c for c in CATEGORIES if c in self.per_category]
        hits = np.array([[s.get(c, False) for c in cats] for s in self.per_scene], dtype=np.float64)
        seen = np.array([[c in s for c in cats] for s in self.per_scene], dtype=np.float64)
        idx = np.random.default_rng(seed).integers(len(hits), size=(BOOTSTRAP_RESAMPLES, len(hits)))
        n = seen[idx].sum(1)  # (R, C)
        with np.errstate(invalid="ignore"):
            means = np.nanmean(np.where(n > 0, hits[idx].sum(1) / n, np.nan), axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        return float(lo), float(hi)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in CATEGORIES:
            if c in self.per_category:
                out.update(self.per_category[c].metrics(f"geneval_{c}"))
        lo, hi = self.overall_interval()
        out.update({"geneval_overall": self.overall, "geneval_overall_n": float(len(self.per_scene)),
                    "geneval_overall_lo": lo, "geneval_overall_hi": hi})  # fmt: skip
        return out


def score_generation(items: Sequence[EvalItem], images: Sequence[np.ndarray]) -> GenerationScores:
    per_scene = [geneval_checks(item.scene, image) for item, image in zip(items, images, strict=True)]
    results: dict[str, list[bool]] = defaultdict(list)
    for checks in per_scene:
        for category, ok in checks.items():
            results[category].append(ok)
    return GenerationScores({c: proportion(v) for c, v in results.items()}, per_scene)


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().replace("?", " ").replace(".", " ").split())


def score_vqa(answers: Sequence[str], truths: Sequence[str]) -> Proportion:
    """Exact match after normalisation, one trial per question (a scene's questions are
    not independent, so the interval is somewhat narrower than it should be)."""
    return proportion(
        [normalise_answer(a) == normalise_answer(t) for a, t in zip(answers, truths, strict=True)]
    )


def edit_succeeded(before: list[dict[str, Any]], edit: dict[str, Any], image: np.ndarray) -> bool:
    """Whether `image` shows `edit` applied to the scene `before` (object dicts):
    exactly the target's objects (shape, colour), every object the instruction does not
    place (all but an added or a moved one) within detector.CENTER_TOLERANCE (0.08 of the
    image side) of where it was, and
    a moved object shifted at least MOVE_MIN_DISTANCE the way the instruction says."""
    target = scene_objects(edit["objects"])
    found = detect(image)
    if not attributes_match(found, target):
        return False
    old_boxes = {tuple(o["bbox"]) for o in before}
    placed = [o for o in target if o.bbox not in old_boxes]  # the added or the moved object
    anchored = [o for o in target if o.bbox in old_boxes]
    pairs = match(found, anchored)
    if len(pairs) != len(anchored):
        return False
    if edit["op"] != "move":
        return True
    (moved,) = placed
    start = next(o for o in scene_objects(before) if o.name == moved.name)
    axis, sign = _DIRECTIONS[edit["instruction"].rsplit(" ", 1)[-1]]
    free = [d for i, d in enumerate(found) if i not in {p[0] for p in pairs} and d.name == moved.name]
    return any(sign * (d.center[axis] - start.center[axis]) > MOVE_MIN_DISTANCE for d in free)


def score_edit_chains(
    items: Sequence[EvalItem], chains: Sequence[Sequence[np.ndarray]]
) -> dict[int, Proportion]:
    """Success after k rounds in a row, for each k in 1..len(edits).

    `chains[i][r]` is the model's image after round r + 1 of item i's edit chain, each
    round continuing from the model's own previous output. Round r is judged against
    round r's target with round r - 1's target (the scene itself for round 1) as
    "before"; success at k rounds means every round 1..k succeeded."""
    rounds = len(items[0].scene["edits"]) if items else 0
    streaks = edit_streaks(items, chains)
    return {k: proportion([s >= k for s in streaks]) for k in range(1, rounds + 1)}


def edit_streaks(items: Sequence[EvalItem], chains: Sequence[Sequence[np.ndarray]]) -> list[int]:
    """Per item, the rounds of its chain that succeeded in a row from the first."""
    streaks = []
    for item, images in zip(items, chains, strict=True):
        before, streak = item.scene["objects"], 0
        for edit, image in zip(item.scene["edits"], images, strict=True):
            if not edit_succeeded(before, edit, image):
                break
            streak += 1
            before = edit["objects"]
        streaks.append(streak)
    return streaks


def vqa_pairs(items: Sequence[EvalItem]) -> list[tuple[EvalItem, str, str]]:
    return [(item, qa["question"], qa["answer"]) for item in items for qa in item.scene["vqa"]]


GENERATION_KINDS = ("single", "pair", "count", "multi")


def category_examples(scores: GenerationScores, images: Sequence[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The first EXAMPLES_PER_CATEGORY generated images of each GenEval category."""
    out: dict[str, list[np.ndarray]] = defaultdict(list)
    for checks, image in zip(scores.per_scene, images, strict=True):
        for category in checks:
            if len(out[category]) < EXAMPLES_PER_CATEGORY:
                out[category].append(image)
    return dict(out)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # name, name_n, name_lo, name_hi for every proportion
    examples: dict[str, list[np.ndarray]]  # "geneval_<category>" / "edit_round_<r>" -> images
    tags: dict[str, str] = field(default_factory=dict)  # for MLflow: the precision it ran in
    # One row per judgement, to see where the model fails: prompt, category, passed, and
    # the image drawn (generation; edit rounds, passed while the chain holds) or the answer.
    samples: list[dict[str, Any]] = field(default_factory=list)


def evaluate_all(
    items: Sequence[EvalItem],
    generate_images: Callable[[list[str]], list[np.ndarray]],
    answer: Callable[[list[EvalItem], list[str]], list[str]],
    edit_chains: Callable[[list[EvalItem]], list[list[np.ndarray]]] | None,
) -> Evaluation:
    """Every score for `items`, with the model behind three callables; `edit_chains`
    None skips editing."""
    gen_items = [i for i in items if i.scene["kind"] in GENERATION_KINDS]
    images = generate_images([i.scene["caption"] for i in gen_items])
    generation = score_generation(gen_items, images)
    metrics = generation.metrics()
    samples = [{"prompt": item.scene["caption"], "category": category, "passed": ok, "image": image}
               for item, checks, image in zip(gen_items, generation.per_scene, images)
               for category, ok in checks.items()]  # fmt: skip
    examples = {f"geneval_{c}": v for c, v in category_examples(generation, images).items()}
    pairs = vqa_pairs(items)
    answers = answer([p[0] for p in pairs], [p[1] for p in pairs])
    metrics.update(score_vqa(answers, [p[2] for p in pairs]).metrics("vqa_accuracy"))
    samples += [{"prompt": question, "category": "vqa", "expected": truth, "answer": answer,
                 "passed": normalise_answer(answer) == normalise_answer(truth)}
                for (_, question, truth), answer in zip(pairs, answers)]  # fmt: skip
    if edit_chains is not None:
        chains = edit_chains(list(items))
        for k, p in score_edit_chains(items, chains).items():
            metrics.update(p.metrics(f"edit_success_{k}"))
        for r in range(len(chains[0]) if chains else 0):
            examples[f"edit_round_{r + 1}"] = [chain[r] for chain in chains[:EXAMPLES_PER_CATEGORY]]
        samples += [{"prompt": edit["instruction"], "category": f"edit_round_{r + 1}", "passed": streak > r,
                     "image": image}
                    for item, chain, streak in zip(items, chains, edit_streaks(items, chains))
                    for r, (edit, image) in enumerate(zip(item.scene["edits"], chain))]  # fmt: skip
    return Evaluation(metrics, examples, samples=samples)
