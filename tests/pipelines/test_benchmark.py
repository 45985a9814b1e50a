"""The scoring judged against ground truth: rendering the true scene must pass every
check, a blank or a wrong image must fail them."""

import numpy as np

from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import scene_objects
from uniloom.pipelines.evaluate.benchmark import (
    CATEGORIES,
    edit_succeeded,
    evaluate_all,
    held_out,
    score_generation,
    score_vqa,
)


def _render(objects, size=64):
    return np.asarray(render(scene_objects(objects), size))


def test_held_out_scenes_are_deterministic_and_disjoint_from_training_seeds():
    a, b = held_out(0, 50), held_out(0, 50)
    assert [i.scene for i in a] == [i.scene for i in b]
    assert {i.scene["kind"] for i in held_out(0, 20, kinds=("pair",))} == {"pair"}


def test_ground_truth_renders_score_one_and_blank_images_score_zero():
    items = held_out(3, 120)
    truth = score_generation(items, [_render(i.scene["objects"]) for i in items])
    assert set(truth.per_category) == set(CATEGORIES)
    assert truth.overall == 1.0
    blank = score_generation(items, [np.full((64, 64, 3), 238, np.uint8) for _ in items])
    assert blank.overall == 0.0


def test_wrong_colour_fails_colour_checks_but_passes_shape_checks():
    items = held_out(4, 40, kinds=("single",))
    recoloured = []
    for i in items:
        o = dict(i.scene["objects"][0])
        o["color"] = "green" if o["color"] != "green" else "red"
        recoloured.append(_render([o]))
    scores = score_generation(items, recoloured)
    assert scores.per_category == {"single_object": 1.0, "colors": 0.0}


def test_edit_success_needs_the_target_scene_and_the_right_direction():
    items = held_out(5, 80)
    for item in items:
        edit = item.scene["edit"]
        assert edit_succeeded(item.scene, _render(edit["objects"]))
        assert not edit_succeeded(item.scene, _render(item.scene["objects"]))


def test_vqa_exact_match_ignores_case_and_punctuation():
    assert score_vqa(["Red.", "two", "yes"], ["red", "three", "yes"]) == 2 / 3


def test_evaluate_all_with_an_oracle_scores_perfectly():
    items = held_out(6, 30)
    by_caption = {i.scene["caption"]: i for i in items}
    answers = {(i.key, qa["question"]): qa["answer"] for i in items for qa in i.scene["vqa"]}
    scores = evaluate_all(
        items,
        generate_images=lambda captions: [_render(by_caption[c].scene["objects"]) for c in captions],
        answer=lambda its, qs: [answers[(i.key, q)] for i, q in zip(its, qs, strict=True)],
        edit_images=lambda its: [_render(i.scene["edit"]["objects"]) for i in its],
    )
    assert (
        scores["geneval_overall"] == 1.0 and scores["vqa_accuracy"] == 1.0 and scores["edit_success"] == 1.0
    )
