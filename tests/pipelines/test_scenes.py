import io
import json
import tarfile

from PIL import Image

from uniloom.pipelines.config import CorpusConfig
from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import COLORS, KINDS, SHAPES, relation, sample_scene, scene_objects
from uniloom.pipelines.corpus.synth import synthesize, write_photos


def test_scenes_are_deterministic_and_cover_the_vocabulary():
    scenes = [sample_scene(0, i) for i in range(400)]
    assert scenes == [sample_scene(0, i) for i in range(400)]
    assert {s["kind"] for s in scenes} == set(KINDS)
    objects = [o for s in scenes for o in s["objects"]]
    assert {o["shape"] for o in objects} == set(SHAPES) and len(SHAPES) >= 3
    assert {o["color"] for o in objects} == set(COLORS) and len(COLORS) >= 6
    assert {len(s["objects"]) for s in scenes} == {1, 2, 3, 4}
    assert {e["op"] for s in scenes for e in s["edits"]} == {"recolour", "move", "add", "remove"}
    assert {len(s["edits"]) for s in scenes} == {3}


def test_pair_captions_state_the_relation_that_holds():
    for i in range(200):
        s = sample_scene(1, i)
        if s["kind"] != "pair":
            continue
        a, b = scene_objects(s["objects"])
        assert relation(a, b) == s["relation"]
        phrase = {"left of": "left of", "right of": "right of"}.get(s["relation"], s["relation"])
        assert phrase in s["caption"] and a.color in s["caption"] and b.shape in s["caption"]
        assert {"question": f"Is the {a.name} {s['relation']} the {b.name}?", "answer": "yes"} in s["vqa"]


def test_objects_do_not_overlap_and_each_edit_round_changes_the_previous_scene():
    for i in range(300):
        s = sample_scene(2, i)
        previous = s["objects"]
        for objects in [previous] + [e["objects"] for e in s["edits"]]:
            boxes = [o["bbox"] for o in objects]
            for j, p in enumerate(boxes):
                assert 0 <= p[0] < p[2] <= 1 and 0 <= p[1] < p[3] <= 1
                for q in boxes[j + 1 :]:
                    assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]
        for edit in s["edits"]:
            assert edit["objects"] != previous and 1 <= len(edit["objects"]) <= 5
            previous = edit["objects"]


def test_render_size_and_background():
    s = sample_scene(0, 5)
    img = render(scene_objects(s["objects"]), 48)
    assert img.size == (48, 48) and img.mode == "RGB"
    assert img.getpixel((0, 0)) == (238, 238, 238)


def test_synthesize_writes_sorted_complete_reproducible_shards(tmp_path):
    cfg = CorpusConfig(num=50, shards=3, size=32, seed=4)
    paths = synthesize(cfg, tmp_path / "a")
    again = synthesize(cfg, tmp_path / "b")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    keys = []
    for p in paths:
        with tarfile.open(p) as tar:
            names = tar.getnames()
        assert names == sorted(names)
        stems = sorted({n.split(".", 1)[0] for n in names})  # webdataset's key: up to the first dot
        members = {
            f"{k}.{m}" for k in stems for m in ("json", "png", "txt", "tgt0.png", "tgt1.png", "tgt2.png")
        }
        assert set(names) == members  # every round's target image beside the sample
        keys += stems
    assert len(keys) == len(set(keys)) == 50


def test_photos_are_real_jpegs_with_captions(tmp_path):
    path = write_photos(tmp_path)
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    jpgs = [n for n in members if n.endswith(".jpg")]
    assert len(jpgs) >= 10
    modes = set()
    for name in jpgs:
        img = Image.open(io.BytesIO(members[name]))
        assert img.format == "JPEG" and min(img.size) >= 100
        modes.add(img.mode)
        stem = name[: -len(".jpg")]
        assert len(members[f"{stem}.txt"].decode()) > 10
        assert json.loads(members[f"{stem}.json"])["kind"] == "photo"
    assert {"RGB", "L"} <= modes
