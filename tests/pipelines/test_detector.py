import numpy as np
from scipy import ndimage

from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import SceneObject, sample_scene, scene_objects
from uniloom.pipelines.evaluate.detector import (
    attributes_match,
    detect,
    relation_holds,
    scene_recovered,
)


def _renders(n: int, size: int = 64, seed: int = 11):
    out = []
    for i in range(n):
        truth = scene_objects(sample_scene(seed, i)["objects"])
        out.append((np.asarray(render(truth, size)), truth))
    return out


def test_exact_scene_recovery_on_1000_clean_renders(report):
    renders = _renders(1000)
    ok = sum(scene_recovered(detect(img), truth) for img, truth in renders)
    report(f"detector exact scene recovery, 1000 clean 64px renders: {ok / 10:.1f}%")
    assert ok >= 990

    rng = np.random.default_rng(0)
    subset = renders[:300]
    for sigma in (5, 10, 20):
        noisy = sum(
            scene_recovered(detect(np.clip(img + rng.normal(0, sigma, img.shape), 0, 255)), truth)
            for img, truth in subset
        )
        report(f"detector under Gaussian noise sigma={sigma}: {100 * noisy / len(subset):.1f}%")
    for blur in (0.5, 1.0, 1.5):
        blurred = sum(
            scene_recovered(detect(ndimage.gaussian_filter(img.astype(float), (blur, blur, 0))), truth)
            for img, truth in subset
        )
        report(f"detector under Gaussian blur sigma={blur}px: {100 * blurred / len(subset):.1f}%")


def test_detector_works_at_other_resolutions():
    for size in (32, 48, 128):
        renders = _renders(100, size=size, seed=3)
        ok = sum(scene_recovered(detect(img), truth) for img, truth in renders)
        assert ok >= 95, (size, ok)


def test_detector_sees_nothing_in_an_empty_image_and_rejects_wrong_scenes():
    blank = np.full((64, 64, 3), 238, np.uint8)
    assert detect(blank) == []
    truth = [
        SceneObject("circle", "red", (0.1, 0.1, 0.35, 0.35)),
        SceneObject("square", "blue", (0.6, 0.1, 0.85, 0.35)),
    ]
    img = np.asarray(render(truth, 64))
    found = detect(img)
    assert scene_recovered(found, truth)
    assert relation_holds(found, truth[0], truth[1], "left of")
    assert not relation_holds(found, truth[0], truth[1], "right of")
    moved = [truth[0], SceneObject("square", "blue", (0.1, 0.6, 0.35, 0.85))]
    assert attributes_match(found, moved) and not scene_recovered(found, moved)
    recoloured = [truth[0], SceneObject("square", "green", truth[1].bbox)]
    assert not attributes_match(found, recoloured)
