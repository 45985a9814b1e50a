"""Readers: each input format written by its own library, read back row by row."""

import io
import json
import logging
import random
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from uniloom.pipelines.data.config import ColumnsConfig, DataConfig
from uniloom.pipelines.data.discovery import HIDDEN, content_hashes, discover
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
    cfg = DataConfig(columns=ColumnsConfig(image=["img"], caption=["alt"], key="id"))
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


# ---------------------------------------------------------------- hostile and odd inputs


def tar_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE, target: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, target, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_tar_links_escaping_names_and_oversized_members_quarantine_their_sample(tmp_path):
    """Every key is one row, and every refused member names itself in its row's reason."""
    big = b"x" * 5000
    with tarfile.open(tmp_path / "hostile.tar", "w") as tar:
        tar_member(tar, "good.png", image_bytes("red"))
        tar_member(tar, "good.txt", b"red")
        tar_member(tar, "link.png", kind=tarfile.SYMTYPE, target="/etc/passwd")
        tar_member(tar, "link.txt", b"a caption")
        tar_member(tar, "hard.png", kind=tarfile.LNKTYPE, target="good.png")
        tar_member(tar, "captionlink.png", image_bytes("blue"))
        tar_member(tar, "captionlink.txt", kind=tarfile.SYMTYPE, target="../../home/u/.ssh/id_rsa")
        tar_member(tar, "../../escape.png", image_bytes("green"))
        tar_member(tar, "/abs/path.png", image_bytes("green"))
        tar_member(tar, "huge.png", big)
        tar_member(tar, "huge.txt", b"a caption")
        tar_member(tar, "dev.png", kind=tarfile.CHRTYPE)
    cfg = DataConfig(max_member_bytes=4096)
    rows = {r["key"]: r for r in rows_of(tmp_path / "hostile.tar", cfg)}
    assert len(rows) == 8 and rows["good"]["status"] == OK
    quarantined = {k: r["reason"] for k, r in rows.items() if r["status"] == QUARANTINED}
    assert quarantined == {
        "link": "member 'link.png' is a symbolic link, which is not followed",
        "hard": "member 'hard.png' is a hard link, which is not followed",
        "captionlink": "member 'captionlink.txt' is a symbolic link, which is not followed",
        "../../escape": "member name '../../escape.png' leads outside the archive",
        "/abs/path": "member name '/abs/path.png' leads outside the archive",
        "huge": "member 'huge.png' (5000 bytes) is larger than max_member_bytes (4096 bytes)",
        "dev": "member 'dev.png' is a character device, which is not followed",
    }
    assert all(r["image"] is None for r in rows.values() if r["status"] == QUARANTINED)


def test_imagefolder_file_names_must_name_an_image_of_the_folder(tmp_path):
    """Absolute, `..` and URL names are refused although the files they name exist and
    are images; names with glob characters read exactly that file; an image that no line
    names is a row without a caption."""
    outside = tmp_path / "outside.png"
    outside.write_bytes(image_bytes("green"))
    folder = tmp_path / "ds"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(image_bytes("red"))
    (folder / "a[1].png").write_bytes(image_bytes("blue"))
    (folder / "a1.png").write_bytes(image_bytes("grey"))
    (folder / "sub" / "orphan.png").write_bytes(image_bytes("red"))
    (folder / "notes.bin").write_bytes(image_bytes("red"))
    names = ["a.png", "a[1].png", "sub/../a1.png", str(outside), "../outside.png", "file:///etc/x.png",
             "notes.bin", "missing.png", ""]  # fmt: skip
    lines = [json.dumps({"file_name": n, "text": f"line {i}"}) for i, n in enumerate(names)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    rows = rows_of(folder)
    assert len(rows) == len(names) + 1  # every line, and the unnamed image
    by_caption = {r["caption"]: r for r in rows}
    assert [colour_of(by_caption[f"line {i}"]["image"]) for i in range(3)] == ["red", "blue", "grey"]
    reasons = [by_caption[f"line {i}"]["reason"] for i in range(3, len(names))]
    assert reasons == [
        f"file_name refused: {str(outside)!r} is an absolute path, not a path inside the dataset",
        "file_name refused: '../outside.png' does not lead to a file inside the dataset folder",
        "file_name refused: 'file:///etc/x.png' is a URL, not a path inside the dataset",
        "image file 'notes.bin' is not among the shard's image files",
        "image file 'missing.png' is not among the shard's image files",
        "file_name refused: empty path",
    ]
    (orphan,) = [r for r in rows if r["caption"] is None]
    assert orphan["key"] == "sub/orphan" and orphan["status"] == QUARANTINED
    assert orphan["reason"] == "image file 'sub/orphan.png' has no line in metadata.jsonl, so no caption"
    assert all(r["image"] is None for r in rows if r["status"] == QUARANTINED)


def test_hf_image_paths_outside_the_shard_folder_are_refused_and_sizes_capped(tmp_path):
    (tmp_path / "secret.png").write_bytes(image_bytes("green"))
    (tmp_path / "ds" / "pics").mkdir(parents=True)
    (tmp_path / "ds" / "pics" / "a.png").write_bytes(image_bytes("red", size=(64, 64)))
    (tmp_path / "ds" / "pics" / "big.png").write_bytes(image_bytes("red") + b"\0" * 5000)
    paths = ["pics/a.png", "../secret.png", str(tmp_path / "secret.png"), "pics/big.png", None]
    embedded = [None, None, None, None, image_bytes("blue") + b"\0" * 5000]
    image = pa.StructArray.from_arrays([pa.array(embedded, pa.binary()), pa.array(paths)], ["bytes", "path"])
    pq.write_table(pa.table({"image": image, "caption": list("abcde")}), tmp_path / "ds" / "data.parquet")
    rows = rows_of(tmp_path / "ds" / "data.parquet", DataConfig(max_member_bytes=5000))
    assert rows[0]["status"] == OK and colour_of(rows[0]["image"]) == "red"
    assert [r["reason"] for r in rows[1:]] == [
        "image path refused: '../secret.png' does not lead to a file inside the dataset folder",
        f"image path refused: {str(tmp_path / 'secret.png')!r} is an absolute path, not a path inside the dataset",
        "image is larger than max_member_bytes (5000 bytes)",
        "image is larger than max_member_bytes (5000 bytes)",
    ]
    assert all(r["image"] is None and r["status"] == QUARANTINED for r in rows[1:])


def test_plain_folder_orphan_captions_and_oversized_files_are_quarantined(tmp_path):
    (tmp_path / "ok.png").write_bytes(image_bytes("red"))
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "lonely.txt").write_text("a caption without its image")
    (tmp_path / "long.png").write_bytes(image_bytes("blue"))
    (tmp_path / "long.txt").write_text("w" * 3000)
    (tmp_path / "README.md").write_text("not a sample")
    rows = {r["key"]: r for r in rows_of(tmp_path, DataConfig(max_member_bytes=2048))}
    assert set(rows) == {"ok", "lonely", "long"} and rows["ok"]["status"] == OK
    assert rows["lonely"]["reason"] == "no image file (has: lonely.txt)"
    assert rows["long"]["reason"] == "file 'long.txt' is larger than max_member_bytes (2048 bytes)"


def test_discovery_counts_and_logs_every_path_it_leaves_out(tmp_path, caplog):
    root = tmp_path / "in"
    (root / "_tmp").mkdir(parents=True)
    (root / ".cache").mkdir()
    for path in ("a.tar", "_tmp/partial.tar", ".cache/b.tar", ".hidden.tar"):
        with wds.TarWriter(str(root / path)) as sink:
            sink.write({"__key__": "k", "png": image_bytes("red"), "txt": "x"})
    pq.write_table(pa.table({"image": [image_bytes("red")], "caption": ["x"]}), root / "stray.parquet")
    (root / "README.md").write_text("not data")
    skipped = Counter()
    with caplog.at_level(logging.WARNING, logger="uniloom.pipelines.data.discovery"):
        shards = discover([str(root)], DataConfig(), skipped)
    assert [s.id for s in shards] == ["a.tar"]
    assert skipped == {HIDDEN: 3, "not part of any webdataset shard": 1}
    assert "skipped 3 path(s), hidden" in caplog.text and "_tmp/partial.tar" in caplog.text
    assert "skipped 1 path(s), not part of any webdataset shard (stray.parquet)" in caplog.text
    (shard,) = discover([str(root / "_tmp" / "partial.tar")], DataConfig())  # named: read
    assert shard.id == "partial.tar"


def test_imagefolder_images_belong_to_their_nearest_metadata_folder(tmp_path):
    for folder in ("ds/train", "ds/train/extra"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "a.png").write_bytes(image_bytes("red"))
        (tmp_path / folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": folder}))
    (tmp_path / "ds" / "loose.png").write_bytes(image_bytes("red"))
    skipped = Counter()
    shards = discover([str(tmp_path / "ds")], DataConfig(), skipped)
    assert {s.id: len(s.files) for s in shards} == {"train": 2, "train/extra": 2}
    assert skipped == {"not part of any imagefolder shard": 1}
    rows = [r for s in shards for b in read_shard(s, DataConfig()) for r in b.to_pylist()]
    assert sorted((r["key"], r["caption"], r["status"]) for r in rows) == [
        ("a", "ds/train", OK),
        ("a", "ds/train/extra", OK),
    ]


def test_an_object_store_failing_a_read_fails_the_shard_instead_of_quarantining_its_row(s3_faults):
    """A quarantined row is final (its shard counts as done), so an image the store would not
    serve after its client's retries must fail the shard, which the next run retries; a
    missing file is the data's fault and is quarantined."""
    import s3fs

    options, faults = s3_faults
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("reader-faults")
    fs.pipe(
        {
            "reader-faults/in/a.png": image_bytes("red"),
            "reader-faults/in/a.txt": b"red",
            "reader-faults/in/b.png": image_bytes("blue"),
            "reader-faults/in/b.txt": b"blue",
        }
    )
    cfg = DataConfig(storage_options=options)
    faults.fail("GET", "/reader-faults/in/b.png", 500, "InternalError")
    with pytest.raises(
        ShardError, match=r"could not read reader-faults/in/b\.png \(OSError: .*InternalError"
    ):
        rows_of("s3://reader-faults/in", cfg)
    faults.fail("GET", "/reader-faults/in/b.png", 404, "NoSuchKey")
    rows = rows_of("s3://reader-faults/in", cfg)
    assert [(r["key"], r["status"]) for r in rows] == [("a", OK), ("b", QUARANTINED)]
    faults.clear()
    assert [r["status"] for r in rows_of("s3://reader-faults/in", cfg)] == [OK, OK]


def test_webdataset_caption_edge_cases_and_orphan_members_each_get_a_row(tmp_path):
    """Every key of the tar is a row: good, empty and megabyte captions go on to the caption
    filter (tests/pipelines/test_data_stages.py), the rest is quarantined with its reason."""
    red = image_bytes("red")
    samples = {
        "ok": {"png": red, "txt": b"a red square"},
        "empty": {"png": red, "txt": b""},
        "latin-1": {"png": red, "txt": "un carré rouge".encode("latin-1")},
        "megabytes": {"png": red, "txt": b"qz" * (1 << 20)},
        "no-caption": {"png": red},
        "no-image": {"txt": b"a caption alone", "json": b"{}"},
    }
    with tarfile.open(tmp_path / "edge.tar", "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    rows = {r["key"]: r for r in rows_of(tmp_path / "edge.tar")}
    assert {k: (r["status"], r["reason"]) for k, r in rows.items()} == {
        "empty": (OK, None),
        "latin-1": (QUARANTINED, "caption is not UTF-8"),
        "megabytes": (OK, None),
        "no-caption": (QUARANTINED, "no caption"),
        "no-image": (QUARANTINED, "no image member (has: json, txt)"),
        "ok": (OK, None),
    }
    assert rows["empty"]["caption"] == "" and len(rows["megabytes"]["caption"]) == 2 << 20


def test_a_file_that_is_not_a_tar_is_a_shard_error_naming_what_it_is(tmp_path):
    (tmp_path / "fake.tar").write_bytes(b"<html>an error page saved as a tar</html>" * 20)
    with pytest.raises(ShardError, match=r"not a readable tar \(ReadError"):
        rows_of(tmp_path / "fake.tar")
