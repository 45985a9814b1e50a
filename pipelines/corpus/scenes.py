"""Compositional scenes: coloured shapes at positions, with captions, VQA pairs and a
chain of edit instructions (each applied to the previous round's result) whose target
scenes are known exactly.

Coordinates are normalised to [0, 1] (x to the right, y downwards) so one scene renders
at any resolution. Objects never overlap and keep a gap, so every object is one
connected region at any size the detector sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle")
# Saturated, well separated colours on a light grey background: the detector classifies
# by nearest palette entry, so pairwise distances are kept large.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 20),
    "purple": (135, 50, 185),
    "orange": (245, 130, 15),
}
BACKGROUND = (238, 238, 238)
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
KINDS = ("single", "pair", "count", "multi")
KIND_WEIGHTS = (0.25, 0.3, 0.2, 0.25)

MIN_SIDE, MAX_SIDE = 0.2, 0.3
GAP = 0.05  # free margin between objects and to the border


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1]

    @property
    def center(self) -> tuple[float, float]:
        return ((self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def a_name(self) -> str:
        return _article(self.name)


def relation(a: SceneObject, b: SceneObject) -> str | None:
    """Where `a` is relative to `b`; None when no axis clearly dominates."""
    dx = a.center[0] - b.center[0]
    dy = a.center[1] - b.center[1]
    if max(abs(dx), abs(dy)) < 0.2 or max(abs(dx), abs(dy)) < 1.5 * min(abs(dx), abs(dy)):
        return None
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _overlaps(bbox, others, gap: float = GAP) -> bool:
    x0, y0, x1, y1 = bbox
    return any(x0 < o[2] + gap and o[0] < x1 + gap and y0 < o[3] + gap and o[1] < y1 + gap for o in others)


def _place(rng: np.random.Generator, taken: list, tries: int = 200):
    """A free square bbox, or None when the canvas is too full."""
    for _ in range(tries):
        side = rng.uniform(MIN_SIDE, MAX_SIDE)
        x0 = rng.uniform(GAP, 1 - GAP - side)
        y0 = rng.uniform(GAP, 1 - GAP - side)
        bbox = (round(x0, 4), round(y0, 4), round(x0 + side, 4), round(y0 + side, 4))
        if not _overlaps(bbox, taken):
            return bbox
    return None


def _objects(rng: np.random.Generator, specs: list[tuple[str, str]]) -> list[SceneObject] | None:
    taken: list = []
    for _ in specs:
        bbox = _place(rng, taken)
        if bbox is None:
            return None
        taken.append(bbox)
    return [SceneObject(s, c, b) for (s, c), b in zip(specs, taken, strict=True)]


def _distinct_specs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n (shape, colour) pairs, all different, so 'the red circle' names one object."""
    combos = [(s, c) for s in SHAPES for c in COLORS]
    idx = rng.choice(len(combos), size=n, replace=False)
    return [combos[i] for i in idx]


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _plural(shape: str) -> str:
    return shape + "s"


def _caption(rng, kind: str, objects: list[SceneObject], rel: str | None) -> str:
    if kind == "single":
        o = objects[0]
        return _pick(
            rng,
            [
                f"{o.a_name}",
                f"a photo of {o.a_name}",
                f"one {o.name} on a plain background",
                f"there is {o.a_name} in the image",
            ],
        )
    if kind == "pair":
        a, b = objects
        phrase = {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)
        return _pick(
            rng,
            [
                f"{a.a_name} {phrase} {b.a_name}",
                f"an image with {a.a_name} placed {phrase} {b.a_name}",
                f"the {a.name} is {phrase} the {b.name}",
            ],
        )
    if kind == "count":
        o, n = objects[0], NUMBER_WORDS[len(objects)]
        return _pick(
            rng,
            [
                f"{n} {o.color} {_plural(o.shape)}",
                f"there are {n} {o.color} {_plural(o.shape)}",
                f"a picture of {n} {o.color} {_plural(o.shape)}",
            ],
        )
    names = [o.a_name for o in sorted(objects, key=lambda o: o.center[0])]
    listing = ", ".join(names[:-1]) + f" and {names[-1]}"
    return _pick(
        rng,
        [listing, f"{NUMBER_WORDS[len(objects)]} shapes: {listing}", f"from left to right, {listing}"],
    )


def _vqa(rng, kind: str, objects: list[SceneObject], rel: str | None) -> list[dict[str, str]]:
    qa = [{"question": "How many objects are there?", "answer": NUMBER_WORDS[len(objects)]}]
    shapes = [o.shape for o in objects]
    colors = [o.color for o in objects]
    for o in objects:
        if shapes.count(o.shape) == 1:
            qa.append({"question": f"What colour is the {o.shape}?", "answer": o.color})
        if colors.count(o.color) == 1:
            qa.append({"question": f"What shape is the {o.color} object?", "answer": o.shape})
    if kind == "count":
        o = objects[0]
        qa.append(
            {"question": f"How many {_plural(o.shape)} are there?", "answer": NUMBER_WORDS[len(objects)]}
        )
    if kind == "pair":
        a, b = objects
        wrong = _pick(rng, [r for r in RELATIONS if r != rel])
        qa.append({"question": f"Is the {a.name} {rel} the {b.name}?", "answer": "yes"})
        qa.append({"question": f"Is the {a.name} {wrong} the {b.name}?", "answer": "no"})
    return qa


_MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _edit(rng, kind: str, objects: list[SceneObject]) -> dict[str, Any]:
    """One feasible edit: recolour, move, add or remove, with its exact target scene."""
    unique = [o for o in objects if [p.name for p in objects].count(o.name) == 1]
    ops = ["add"] + (["recolour", "move"] if unique else []) + (["remove"] if len(objects) > 1 else [])
    for _ in range(20):
        op = _pick(rng, ops)
        if op == "add":
            taken = [o.bbox for o in objects]
            bbox = _place(rng, taken)
            if bbox is None or len(objects) >= 5:
                continue
            shape, color = (
                (objects[0].shape, objects[0].color) if kind == "count" else _distinct_specs(rng, 1)[0]
            )
            new = SceneObject(shape, color, bbox)
            text = (
                f"add another {new.name}" if any(o.name == new.name for o in objects) else f"add {new.a_name}"
            )
            return {"op": op, "instruction": text, "target": objects + [new]}
        target_obj = _pick(rng, unique) if op in ("recolour", "move") else _pick(rng, objects)
        rest = [o for o in objects if o is not target_obj]
        if op == "remove":
            article = "the" if target_obj in unique else "one"
            return {"op": op, "instruction": f"remove {article} {target_obj.name}", "target": rest}
        if op == "recolour":
            color = _pick(rng, [c for c in COLORS if c != target_obj.color])
            new = replace(target_obj, color=color)
            text = _pick(
                rng, [f"make the {target_obj.name} {color}", f"change the {target_obj.name} to {color}"]
            )
            return {"op": op, "instruction": text, "target": [new if o is target_obj else o for o in objects]}
        direction = _pick(rng, list(_MOVES))
        ux, uy = _MOVES[direction]
        step = rng.uniform(0.2, 0.35)
        x0, y0, x1, y1 = target_obj.bbox
        bbox = tuple(round(v, 4) for v in (x0 + ux * step, y0 + uy * step, x1 + ux * step, y1 + uy * step))
        inside = GAP <= bbox[0] and bbox[2] <= 1 - GAP and GAP <= bbox[1] and bbox[3] <= 1 - GAP
        if inside and not _overlaps(bbox, [o.bbox for o in rest]):
            new = replace(target_obj, bbox=bbox)
            text = f"move the {target_obj.name} {direction}"
            return {"op": op, "instruction": text, "target": [new if o is target_obj else o for o in objects]}
    # Removing is always possible for scenes with several objects; a lone object can
    # always be recoloured.
    o = objects[-1]
    if len(objects) > 1:
        return {"op": "remove", "instruction": f"remove the {o.name}", "target": objects[:-1]}
    color = next(c for c in COLORS if c != o.color)
    return {
        "op": "recolour",
        "instruction": f"make the {o.name} {color}",
        "target": [replace(o, color=color)],
    }


EDIT_ROUNDS = 3


def sample_scene(
    seed: int, index: int, max_objects: int = 4, edit_rounds: int = EDIT_ROUNDS
) -> dict[str, Any]:
    """The scene for sample `index` of corpus `seed`: a JSON-ready dict (ground truth).
    `edits` is a chain: round r's instruction applies to round r - 1's target (round 0's
    to the scene), and every intermediate target is recorded."""
    rng = np.random.default_rng([seed, index])
    while True:
        kind = KINDS[int(rng.choice(len(KINDS), p=KIND_WEIGHTS))]
        if kind == "single" or max_objects == 1:
            kind, specs = "single", _distinct_specs(rng, 1)
        elif kind == "pair":
            specs = _distinct_specs(rng, 2)
        elif kind == "count":
            n = int(rng.integers(2, max_objects + 1))
            specs = _distinct_specs(rng, 1) * n
        else:
            specs = _distinct_specs(rng, int(rng.integers(3, max(3, max_objects) + 1)))
        objects = _objects(rng, specs)
        if objects is None:
            continue
        rel = relation(objects[0], objects[1]) if kind == "pair" else None
        if kind == "pair" and rel is None:
            continue
        break
    caption, vqa = _caption(rng, kind, objects, rel), _vqa(rng, kind, objects, rel)
    edits, current = [], objects
    for _ in range(edit_rounds):
        edit = _edit(rng, kind, current)
        current = edit["target"]
        edits.append(
            {"op": edit["op"], "instruction": edit["instruction"], "objects": [asdict(o) for o in current]}
        )
    return {
        "kind": kind,
        "objects": [asdict(o) for o in objects],
        "relation": rel,
        "caption": caption,
        "vqa": vqa,
        "edits": edits,
    }


def scene_objects(items: list[dict[str, Any]]) -> list[SceneObject]:
    return [SceneObject(o["shape"], o["color"], tuple(o["bbox"])) for o in items]
