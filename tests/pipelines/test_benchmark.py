"""The scoring judged against ground truth: rendering the true scene must pass every
check, a blank or a wrong image must fail them; the splits are disjoint; the intervals
are right on known counts; gates judge lower bounds."""

import math

import numpy as np
import pytest

from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import _overlaps, sample_scene, scene_objects
from uniloom.pipelines.evaluate.benchmark import (
    CATEGORIES,
    edit_succeeded,
    evaluate_all,
    geneval_checks,
    held_out,
    score_edit_chains,
    score_generation,
    score_vqa,
    wilson,
)
from uniloom.pipelines.evaluate.report import format_table, rows
from uniloom.pipelines.evaluate.univision import gate_passes


def _render(objects, size=64):
    return np.asarray(render(scene_objects(objects), size))


def _objects(scene):
    return tuple((o["shape"], o["color"], tuple(o["bbox"])) for o in scene["objects"])


def test_splits_are_deterministic_and_disjoint_from_each_other_and_from_training():
    test, val = held_out(0, 500), held_out(0, 200, split="val")
    assert [i.scene for i in test[:50]] == [i.scene for i in held_out(0, 50)]
    training = {_objects(sample_scene(0, index)) for index in range(2000)}  # corpus seed 0's first scenes
    test_scenes, val_scenes = {_objects(i.scene) for i in test}, {_objects(i.scene) for i in val}
    assert len(test_scenes) == 500 and len(val_scenes) == 200
    assert not test_scenes & training and not val_scenes & training and not test_scenes & val_scenes
    assert {i.scene["kind"] for i in held_out(0, 20, kinds=("pair",))} == {"pair"}


def test_wilson_interval_on_known_counts():
    # Reference values (Wilson 1927; Newcombe 1998, table I): 0/10, 5/10, 24/24, 81/263.
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(24, 24)[0] == pytest.approx(24 / (24 + 1.959964**2), abs=1e-6)
    # the interval holds k/n exactly, 0/n and n/n included (no rounding past either end)
    for n in range(1, 301):
        for k in range(n + 1):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
        assert wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_ground_truth_renders_score_one_and_blank_images_score_zero():
    items = held_out(3, 120)
    truth = score_generation(items, [_render(i.scene["objects"]) for i in items])
    assert set(truth.per_category) == set(CATEGORIES)
    assert truth.overall == 1.0 and truth.overall_interval() == (1.0, 1.0)
    metrics = truth.metrics()
    assert metrics["geneval_two_object_n"] == sum(i.scene["kind"] == "pair" for i in items)
    pairs = int(metrics["geneval_two_object_n"])
    assert metrics["geneval_two_object_lo"] == pytest.approx(wilson(pairs, pairs)[0]) and pairs > 0
    blank = score_generation(items, [np.full((64, 64, 3), 238, np.uint8) for _ in items])
    assert blank.overall == 0.0 and blank.overall_interval() == (0.0, 0.0)


def test_overall_interval_is_a_bootstrap_around_a_mixed_score():
    items = held_out(8, 200)
    images = [
        _render(i.scene["objects"]) if n % 2 else np.full((64, 64, 3), 238, np.uint8)
        for n, i in enumerate(items)
    ]
    scores = score_generation(items, images)
    lo, hi = scores.overall_interval()
    assert 0.3 < lo < scores.overall < hi < 0.7
    assert hi - lo < 0.2


def test_two_object_refuses_one_object_when_both_share_a_shape():
    pair = next(
        i.scene
        for i in held_out(0, 400, kinds=("pair",))
        if i.scene["objects"][0]["shape"] == i.scene["objects"][1]["shape"]
    )
    a, b = pair["objects"]
    both = geneval_checks(pair, _render([a, b]))
    assert both == {"two_object": True, "color_attr": True, "position": True}
    for one in ([a], [b]):
        assert geneval_checks(pair, _render(one))["two_object"] is False
    # two of the right shape, one colour wrong: two objects yes, colour attribution no
    wrong = dict(b, color=next(c for c in ("red", "green", "blue") if c not in (a["color"], b["color"])))
    assert geneval_checks(pair, _render([a, wrong]))["two_object"] is True
    assert geneval_checks(pair, _render([a, wrong]))["color_attr"] is False


def test_extra_objects_fail_every_category():
    """Clutter is not credit: the right object among others passes nothing."""
    scenes = {k: next(i.scene for i in held_out(0, 200, kinds=(k,))) for k in ("single", "pair", "count")}
    for kind, scene in scenes.items():
        taken = [o["bbox"] for o in scene["objects"]]
        corners = (
            [0.05, 0.05, 0.25, 0.25],
            [0.7, 0.7, 0.9, 0.9],
            [0.05, 0.7, 0.25, 0.9],
            [0.7, 0.05, 0.9, 0.25],
        )
        free = next(b for b in corners if not _overlaps(b, taken))
        extra = {"shape": "circle", "color": "purple", "bbox": free}
        assert all(geneval_checks(scene, _render(scene["objects"])).values()), kind
        assert not any(geneval_checks(scene, _render(scene["objects"] + [extra])).values()), kind


def test_wrong_colour_fails_colour_checks_but_passes_shape_checks():
    items = held_out(4, 40, kinds=("single",))
    recoloured = []
    for i in items:
        o = dict(i.scene["objects"][0])
        o["color"] = "green" if o["color"] != "green" else "red"
        recoloured.append(_render([o]))
    scores = score_generation(items, recoloured)
    assert {c: p.value for c, p in scores.per_category.items()} == {"single_object": 1.0, "colors": 0.0}


def test_edit_success_needs_the_target_scene_and_the_right_direction():
    for item in held_out(5, 80):
        edit = item.scene["edits"][0]
        assert edit_succeeded(item.scene["objects"], edit, _render(edit["objects"]))
        assert not edit_succeeded(item.scene["objects"], edit, _render(item.scene["objects"]))


def test_edit_check_refuses_a_moved_untouched_object():
    circle = {"shape": "circle", "color": "red", "bbox": (0.1, 0.1, 0.35, 0.35)}
    square = {"shape": "square", "color": "blue", "bbox": (0.6, 0.1, 0.85, 0.35)}
    green = dict(circle, color="green")
    recolour = {"op": "recolour", "instruction": "make the red circle green", "objects": [green, square]}
    assert edit_succeeded([circle, square], recolour, _render([green, square]))
    drifted = dict(square, bbox=(0.6, 0.3, 0.85, 0.55))  # untouched, yet 0.2 lower
    assert not edit_succeeded([circle, square], recolour, _render([green, drifted]))
    moved_circle = dict(circle, bbox=(0.1, 0.6, 0.35, 0.85))
    move = {"op": "move", "instruction": "move the red circle down", "objects": [moved_circle, square]}
    assert edit_succeeded([circle, square], move, _render([moved_circle, square]))
    assert not edit_succeeded([circle, square], move, _render([moved_circle, drifted]))
    wrong_way = dict(circle, bbox=(0.1, 0.0, 0.35, 0.25))
    assert not edit_succeeded([circle, square], move, _render([wrong_way, square]))


def test_multi_round_success_needs_every_round_so_far():
    items = held_out(9, 40)
    targets = [[_render(e["objects"]) for e in i.scene["edits"]] for i in items]
    sources = [[_render(i.scene["objects"])] * 3 for i in items]
    perfect = score_edit_chains(items, targets)
    assert {k: (p.value, p.n) for k, p in perfect.items()} == {1: (1.0, 40), 2: (1.0, 40), 3: (1.0, 40)}
    assert all(p.value == 0.0 for p in score_edit_chains(items, sources).values())
    # right in round 1, then the model repeats round 1's image: later rounds fail
    stuck = [[t[0], t[0], t[2]] for t in targets]
    scores = score_edit_chains(items, stuck)
    assert scores[1].value == 1.0 and scores[2].value == 0.0 and scores[3].value == 0.0
    # a failed round 2 fails round 3 even when round 3's image is right
    blank = np.full((64, 64, 3), 238, np.uint8)
    assert score_edit_chains(items, [[t[0], blank, t[2]] for t in targets])[3].value == 0.0


def test_vqa_exact_match_ignores_case_and_punctuation():
    p = score_vqa(["Red.", "two", "yes"], ["red", "three", "yes"])
    assert (p.k, p.n, p.value) == (2, 3, 2 / 3)


def test_evaluate_all_with_an_oracle_scores_perfectly_on_every_question_and_round():
    items = held_out(6, 30)
    by_caption = {i.scene["caption"]: i for i in items}
    answers = {(i.key, qa["question"]): qa["answer"] for i in items for qa in i.scene["vqa"]}
    evaluation = evaluate_all(
        items,
        generate_images=lambda captions: [_render(by_caption[c].scene["objects"]) for c in captions],
        answer=lambda its, qs: [answers[(i.key, q)] for i, q in zip(its, qs, strict=True)],
        edit_chains=lambda its: [[_render(e["objects"]) for e in i.scene["edits"]] for i in its],
    )
    m = evaluation.metrics
    assert m["geneval_overall"] == 1.0 and m["vqa_accuracy"] == 1.0
    assert m["vqa_accuracy_n"] == sum(len(i.scene["vqa"]) for i in items) > len(items)
    for k in (1, 2, 3):
        assert (m[f"edit_success_{k}"], m[f"edit_success_{k}_n"]) == (1.0, 30)
        assert m[f"edit_success_{k}_lo"] == pytest.approx(wilson(30, 30)[0])
    assert {"geneval_two_object_lo", "geneval_overall_hi", "vqa_accuracy_hi"} <= set(m)
    assert set(evaluation.examples) >= {f"geneval_{c}" for c in CATEGORIES} | {"edit_round_3"}
    table = format_table(m)
    assert "geneval_two_object" in table and f"[{wilson(30, 30)[0]:.3f}, 1.000]" in table
    assert {r["metric"] for r in rows(m)} >= {"geneval_overall", "vqa_accuracy", "edit_success_3"}


def test_gates_judge_the_lower_bound_of_an_interval():
    lucky = {"geneval_overall": 1.0, "geneval_overall_n": 4, "geneval_overall_lo": 0.51}
    ok, failures = gate_passes(lucky, {"geneval_overall": 0.75})
    assert not ok and "lower bound 0.510" in failures[0]
    assert gate_passes({"x": 0.8, "x_n": 500, "x_lo": 0.76}, {"x": 0.75}) == (True, [])
    assert gate_passes({"psnr": 31.0}, {"psnr": 28.0}) == (True, [])  # no interval: the value
    assert not gate_passes({"psnr": math.nan}, {"psnr": 28.0})[0]
    assert not gate_passes({}, {"psnr": 28.0})[0]
