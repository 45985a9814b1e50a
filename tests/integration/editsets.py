"""A small editing set in the layouts public editing sets use (source, instruction, target;
multi-round chains), written by each format's own library: a webdataset tar, Parquet files
a Hugging Face dataset laid out as a Hub repository, and a folder of files named as the
tar's members. `EDITS` and `QUARANTINED` say what
the data stage should make of each sample."""

import io
import json
import os

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image


def picture(seed: int) -> Image.Image:
    """A distinct 40x48 picture per seed (blocks of random colours)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    return Image.fromarray(np.repeat(np.repeat(blocks, 8, 0), 8, 1))


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    picture(seed).save(buf, format="PNG")
    return buf.getvalue()


# What each sample of the set should become: key -> (instructions, target seeds), or the
# reason it is quarantined.
EDITS = {
    "w-single": (["make it brighter"], [101]),
    "w-json": (["turn it around"], [111]),
    "w-multi": (["add a square", "make it red", "remove the circle"], [121, 122, 123]),
    "p-single": (["swap the colours"], [201]),
    "p-multi": (["crop the top", "blur it"], [231, 232]),
    "h-single": (["mirror it"], [301]),
    "h-multi": (["add a cat", "make it night", "zoom out"], [311, 312, 313]),
    "f-single": (["paint it blue"], [401]),
    "f-multi": (["shrink it", "move it left"], [411, 412]),
}
QUARANTINED = {
    "w-no-instruction": "edit round 0 has no instruction",
    "w-no-target": "edit round 0 has no target image",
    "p-no-target": "edit round 0 has no target image",
    "p-no-instruction": "edit round 0 has no instruction",
    "h-broken": "edit round 1 has no target image",
    "f-no-instruction": "edit round 0 has no instruction",
}


def write_webdataset(folder) -> None:
    """`{key}.src.png` + `{key}.tgt.png` + `{key}.txt`, a JSON naming the members, and a
    JSON listing three rounds."""
    os.makedirs(folder)
    with wds.TarWriter(str(folder / "edits-000.tar")) as sink:
        sink.write(
            {"__key__": "w-single", "src.png": png(100), "tgt.png": png(101), "txt": "make it brighter"}
        )
        sink.write({
            "__key__": "w-json", "src.png": png(110), "after.png": png(111),
            "json": {"instruction": "turn it around", "target": "w-json.after.png"},
        })  # fmt: skip
        rounds = [{"instruction": t, "target": f"tgt{r}.png"} for r, t in enumerate(EDITS["w-multi"][0])]
        sink.write({
            "__key__": "w-multi", "src.png": png(120), "txt": "a picture of blocks", "json": {"edits": rounds},
            **{f"tgt{r}.png": png(121 + r) for r in range(3)},
        })  # fmt: skip
        sink.write({"__key__": "w-no-instruction", "src.png": png(130), "tgt.png": png(131)})
        sink.write({
            "__key__": "w-no-target", "src.png": png(140), "json": {"instruction": "x", "target": "gone.png"},
        })  # fmt: skip


def write_folder(folder) -> None:
    """The webdataset layout unpacked into files: `{key}.src.png` + `{key}.tgt.png` +
    `{key}.txt`, and a JSON listing rounds with `{key}.tgt0.png`, `{key}.tgt1.png`."""
    os.makedirs(folder)
    (folder / "f-single.src.png").write_bytes(png(400))
    (folder / "f-single.tgt.png").write_bytes(png(401))
    (folder / "f-single.txt").write_text("paint it blue")
    rounds = [{"instruction": t, "target": f"tgt{r}.png"} for r, t in enumerate(EDITS["f-multi"][0])]
    (folder / "f-multi.src.png").write_bytes(png(410))
    (folder / "f-multi.txt").write_text("a picture of blocks")
    (folder / "f-multi.json").write_text(json.dumps({"edits": rounds}))
    for r in range(2):
        (folder / f"f-multi.tgt{r}.png").write_bytes(png(411 + r))
    (folder / "f-no-instruction.src.png").write_bytes(png(420))
    (folder / "f-no-instruction.tgt.png").write_bytes(png(421))


def write_parquet(folder) -> None:
    """Columns source_image / instruction / edited_image; a second file with an `edits`
    column of [{instruction, target}]."""
    os.makedirs(folder)
    single = {
        "key": ["p-single", "p-no-target", "p-no-instruction"],
        "source_image": [png(200), png(210), png(220)],
        "instruction": ["swap the colours", "a lost target", None],
        "edited_image": [png(201), None, png(221)],
    }
    pq.write_table(pa.table(single), folder / "single.parquet")
    rounds = [{"instruction": t, "target": png(231 + r)} for r, t in enumerate(EDITS["p-multi"][0])]
    pq.write_table(
        pa.table({"key": ["p-multi"], "source_image": [png(230)], "edits": [rounds]}),
        folder / "multi.parquet",
    )


def write_hub_repo(folder) -> None:
    """A Hugging Face dataset as a Hub repository lays it out: two Parquet data files
    (so two stream shards), Image features, rounds as a list of {instruction, target}."""
    features = datasets.Features({
        "key": datasets.Value("string"), "source_image": datasets.Image(),
        "edits": [{"instruction": datasets.Value("string"), "target": datasets.Image()}],
    })  # fmt: skip

    def rows(key: str, seed: int, instructions: list, targets: list) -> dict:
        edits = [
            {"instruction": t, "target": picture(s) if s else None} for t, s in zip(instructions, targets)
        ]
        return {"key": key, "source_image": picture(seed), "edits": edits}

    parts = [
        [rows("h-single", 300, *EDITS["h-single"]), rows("h-broken", 320, ["a", "b"], [321, None])],
        [rows("h-multi", 310, *EDITS["h-multi"])],
    ]
    os.makedirs(folder / "data")
    for i, part in enumerate(parts):
        ds = datasets.Dataset.from_list(part, features=features)
        ds.to_parquet(str(folder / "data" / f"train-{i:05d}-of-00002.parquet"))
