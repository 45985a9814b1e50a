"""Readers: each input format written by its own library, read back row by row."""

import io
import json
import random
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.discovery import content_hashes, discover
from uniloom.pipelines.data.readers import ShardError, read_shard
from uniloom.pipelines.data.stages import OK, QUARANTINED
from uniloom.pipelines.errors import UniloomError

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "grey": (128, 128, 128)}


def image_bytes(color: str, fmt: str = "PNG", size=(40, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLORS[color]).save(buf, format=fmt)
    return buf.getvalue()


def colour_of(data: bytes) -> str:
    pixel = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[5, 5].astype(int)
    return min(COLORS, key=lambda c: np.abs(pixel - COLORS[c]).sum())


def rows_of(path, cfg=None) -> list[dict]:
    cfg = cfg or DataConfig()
    (shard,) = discover([str(path)], cfg)
    return [r for block in read_shard(shard, cfg) for r in block.to_pylist()]


def test_webdataset_keeps_image_and_caption_of_a_key_together_in_an_unsorted_tar(tmp_path):
    members = []
    for i, color in enumerate(["red", "green", "blue", "grey"]):
        members += [(f"s{i}.png", image_bytes(color)), (f"s{i}.txt", f"a {color} square".encode())]
    random.Random(3).shuffle(members)
    with tarfile.open(tmp_path / "shuffled.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = rows_of(tmp_path / "shuffled.tar")
    assert [r["key"] for r in rows] == ["s0", "s1", "s2", "s3"]
    for r in rows:
        assert r["status"] == OK and r["caption"] == f"a {colour_of(r['image'])} square"


def test_webdataset_written_by_tarwriter_with_json_and_a_key_missing_its_caption(tmp_path):
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "k0", "jpg": image_bytes("red", "JPEG"), "txt": "red", "json": {"kind": "x"}})
        sink.write({"__key__": "k1", "png": image_bytes("blue")})
    r0, r1 = rows_of(tmp_path / "a.tar")
    assert (r0["key"], r0["caption"], json.loads(r0["meta"])) == ("k0", "red", {"kind": "x"})
    assert colour_of(r0["image"]) == "red"
    assert r1["status"] == QUARANTINED and r1["reason"] == "no caption"


def test_parquet_with_configured_column_names(tmp_path):
    table = pa.table(
        {
            "id": ["x1", "x2"],
            "img": [image_bytes("green"), image_bytes("blue", "JPEG")],
            "alt": ["green thing", "blue thing"],
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet")
    cfg = DataConfig(image_fields=["img"], caption_fields=["alt"], key_field="id")
    rows = rows_of(tmp_path, cfg)
    assert [(r["key"], r["caption"], colour_of(r["image"])) for r in rows] == [
        ("x1", "green thing", "green"),
        ("x2", "blue thing", "blue"),
    ]


def test_parquet_without_a_caption_column_is_a_shard_error_that_names_the_columns(tmp_path):
    pq.write_table(pa.table({"image": [image_bytes("red")], "label": ["a"]}), tmp_path / "bad.parquet")
    (shard,) = discover([str(tmp_path)], DataConfig())
    with pytest.raises(
        ShardError, match=r"no caption column \(looked for caption, txt, text; has: image, label\)"
    ):
        list(read_shard(shard, DataConfig()))


def test_hugging_face_save_to_disk_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (32, 32), COLORS[c]) for c in ("red", "green")], "caption": ["r", "g"]}
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    shards = discover([str(tmp_path / "hf")], DataConfig())
    assert [s.format for s in shards] == ["hf"] and shards[0].id.endswith(".arrow")
    rows = [r for s in shards for b in read_shard(s, DataConfig()) for r in b.to_pylist()]
    assert [(r["key"], r["caption"], colour_of(r["image"])) for r in rows] == [
        ("00000000", "r", "red"),
        ("00000001", "g", "green"),
    ]


def test_imagefolder_with_metadata_jsonl(tmp_path):
    import datasets

    folder = tmp_path / "imgs" / "train"
    folder.mkdir(parents=True)
    lines = []
    for name, color in (("a.png", "red"), ("b.jpg", "blue")):
        (folder / name).write_bytes(image_bytes(color, "PNG" if name.endswith("png") else "JPEG"))
        lines.append(json.dumps({"file_name": name, "text": f"{color} picture"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    hf = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "imgs"), split="train")
    assert sorted(hf["text"]) == ["blue picture", "red picture"]  # a real imagefolder
    rows = rows_of(tmp_path / "imgs")
    assert [(r["key"], r["caption"], colour_of(r["image"])) for r in rows] == [
        ("a", "red picture", "red"),
        ("b", "blue picture", "blue"),
    ]


def test_plain_folder_with_sidecar_captions_quarantines_an_image_without_one(tmp_path):
    for name, color in (("one", "red"), ("two", "green"), ("three", "grey")):
        (tmp_path / f"{name}.png").write_bytes(image_bytes(color))
    (tmp_path / "one.txt").write_text("the red one")
    (tmp_path / "two.txt").write_text("the green one")
    rows = {r["key"]: r for r in rows_of(tmp_path)}
    assert rows["one"]["caption"] == "the red one" and colour_of(rows["one"]["image"]) == "red"
    assert rows["two"]["status"] == OK
    assert rows["three"]["status"] == QUARANTINED and rows["three"]["reason"] == "no caption"


def test_discovery_names_shards_by_relative_path_and_hashes_content(tmp_path):
    for name in ("corpus", "photos"):
        (tmp_path / name).mkdir()
        with wds.TarWriter(str(tmp_path / name / f"{name}-0.tar")) as sink:
            sink.write({"__key__": "k", "png": image_bytes("red"), "txt": name})
    shards = discover([str(tmp_path / "corpus"), str(tmp_path / "photos")], DataConfig())
    assert [s.id for s in shards] == ["corpus/corpus-0.tar", "photos/photos-0.tar"]
    before = content_hashes(shards, {})
    (tmp_path / "photos" / "photos-0.tar").write_bytes(b"changed")
    after = content_hashes(shards, {})
    assert before["corpus/corpus-0.tar"] == after["corpus/corpus-0.tar"]
    assert before["photos/photos-0.tar"] != after["photos/photos-0.tar"]
    with pytest.raises(UniloomError, match="does not exist"):
        discover([str(tmp_path / "nowhere")], DataConfig())


def test_hf_image_struct_without_bytes_reads_the_file_at_its_path(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(image_bytes("green"))
    image = pa.StructArray.from_arrays(
        [pa.array([None, image_bytes("red")], pa.binary()), pa.array(["pics/a.png", None])], ["bytes", "path"]
    )
    pq.write_table(pa.table({"image": image, "caption": ["g", "r"]}), tmp_path / "data.parquet")
    rows = rows_of(tmp_path / "data.parquet")
    assert [(r["caption"], colour_of(r["image"])) for r in rows] == [("g", "green"), ("r", "red")]


def test_a_repeated_key_within_a_shard_is_quarantined(tmp_path):
    table = pa.table({"key": ["a", "b", "a"], "image": [image_bytes("red")] * 3, "caption": ["x", "y", "z"]})
    pq.write_table(table, tmp_path / "keys.parquet")
    rows = rows_of(tmp_path / "keys.parquet")
    assert [(r["key"], r["status"], r["reason"]) for r in rows] == [
        ("a", OK, None),
        ("b", OK, None),
        ("a", QUARANTINED, "duplicate key in the shard"),
    ]
