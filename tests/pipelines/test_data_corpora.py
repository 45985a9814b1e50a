"""Real corpora: a small editing set in the layouts public editing sets use (source,
instruction, target; multi-round chains) as a webdataset tar, Parquet files and a Hugging
Face dataset named `hf://NAME:split`, through the data stage (the runner's path, stages in
this process) into output shards whose training samples carry its targets; broken samples
quarantined with their reasons, and the counts adding up. Also: the one tar reader keys
members as webdataset does, and the data stage does not import the synthetic corpus."""

import io
import shutil
from dataclasses import asdict

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from editsets import (
    EDITS,
    QUARANTINED,
    picture,
    write_folder,
    write_hub_repo,
    write_parquet,
    write_webdataset,
)
from PIL import Image

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.codehash import Sources
from uniloom.pipelines.config import UniloomConfig, load_config
from uniloom.pipelines.data.commit import Committer, OutputSpec, shard_paths
from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.dedup import DedupIndex
from uniloom.pipelines.data.discovery import discover
from uniloom.pipelines.data.image_tokenizer import Encoder, save_random_weights
from uniloom.pipelines.data.images import square_pixels
from uniloom.pipelines.data.prepare import Prepare
from uniloom.pipelines.data.readers import read_shard
from uniloom.pipelines.data.runner import prepare_run
from uniloom.pipelines.data.source import read_marked
from uniloom.pipelines.data.tars import read_tar_file, split_name
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train.config import StageConfig
from uniloom.pipelines.train.data import COLUMNS, TaskSampler

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip


def run_in_process(cfg: UniloomConfig, inputs: list[str], out: str):
    """What runner.run does, with the stages in this process instead of on Ray."""
    state = prepare_run(cfg, inputs, out)
    cfg, manifest, p, stage = state["cfg"], state["manifest"], state["plan"], state["stage"]
    prep = Prepare(cfg.data, cfg.mingtok.image_size, state["text"])
    enc = Encoder(asdict(cfg.mingtok), cfg.data.tokenizer_weights, {}, asdict(cfg.data.exec), "float32")
    spec = OutputSpec(32, (SMALL.num_tokens, 32), "float32", stage.text_tokenizer, stage.image_tokenizer)
    committer = Committer(manifest, p.todo, state["hashes"], stage, DedupIndex(cfg.data.filters), spec)
    for shard in p.todo:
        for block in read_marked(shard, cfg.data):
            committer.add(enc(prep(block)))
    committer.finish()
    manifest.save()
    return manifest, committer, enc


@pytest.fixture(scope="module")
def editing_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("editing")
    write_webdataset(root / "wds")
    write_parquet(root / "parquet")
    write_hub_repo(root / "hub")
    write_folder(root / "folder")
    cfg = UniloomConfig(mingtok=SMALL)
    cfg.data.tokenizer_weights = save_random_weights(SMALL, str(root / "w.safetensors"))
    cfg.data.bpe_vocab_size = 300
    inputs = [str(root / "wds"), str(root / "parquet"), f"hf://{root / 'hub'}:train", str(root / "folder")]
    manifest, committer, encoder = run_in_process(cfg, inputs, str(root / "out"))
    return root, manifest, committer, encoder


def test_an_editing_set_from_webdataset_parquet_and_hugging_face_reaches_training_samples(editing_run):
    root, manifest, committer, encoder = editing_run
    assert not committer.errors
    assert sorted(manifest.shards) == [
        "folder/.", "hub/train-00000-of-00002", "hub/train-00001-of-00002",
        "parquet/multi.parquet", "parquet/single.parquet", "wds/edits-000.tar",
    ]  # fmt: skip
    assert {manifest.shards[s]["format"] for s in manifest.shards} == {
        "folder",
        "hub",
        "parquet",
        "webdataset",
    }

    # Counts add up per shard; every broken sample is quarantined with its reason.
    reasons = {}
    for sid, entry in manifest.shards.items():
        rows = entry["rows"]
        assert rows["read"] == rows["written"] + sum(rows["filtered"].values()) + rows["quarantined"], sid
        quarantine = pq.read_table(shard_paths(manifest, sid)["quarantine"]).to_pylist()
        reasons.update({r["key"]: r["reason"] for r in quarantine})
    assert reasons == QUARANTINED
    assert sum(e["rows"]["written"] for e in manifest.shards.values()) == len(EDITS)

    rows = {
        r["key"]: r
        for sid in manifest.shards
        for r in pq.read_table(
            shard_paths(manifest, sid)["output"], columns=[*COLUMNS, "edit_instruction"]
        ).to_pylist()
    }
    assert set(rows) == set(EDITS)
    t = load_config("tiny", overrides=["train.guidance_drop=0.0", "train.seq_len=512"]).train
    editing = TaskSampler(StageConfig(mix={"editing": 1.0}), t, rows["w-single"]["image_tokenizer"])
    captioning = TaskSampler(StageConfig(mix={"text_to_image": 1.0}), t, rows["w-single"]["image_tokenizer"])
    seen_rounds = set()
    for key, (instructions, seeds) in EDITS.items():
        row = rows[key]
        assert row["edit_instruction"] == instructions, key
        # Round r's target: the set's own image, cropped and encoded like any source.
        targets = np.stack([square_pixels(picture(s), SMALL.image_size) for s in seeds])
        expected = torch.from_numpy(encoder.encode(targets))  # (R, N, C)
        stored = np.stack(
            [np.frombuffer(z, np.float32).reshape(SMALL.num_tokens, 32) for z in row["edit_latents"]]
        )
        assert np.allclose(stored, expected.numpy(), atol=1e-5), key
        for epoch in range(6):
            sample = editing(row, epoch)
            generated = sample.image_latents[sample.image_targets[sample.image_mask]].view(
                -1, SMALL.num_tokens, 32
            )
            n = generated.shape[0]
            seen_rounds.add(n)
            assert torch.allclose(generated, expected[:n], atol=1e-5), (key, epoch)
        if row["text_ids"] is None:  # an edit sample without a caption trains editing only
            assert captioning(row, 0) is None
    assert seen_rounds == {1, 2, 3}
    # all but w-multi and f-multi: no caption
    assert captioning.no_task == 7 and rows["w-multi"]["text_ids"] and rows["f-multi"]["text_ids"]


def test_a_hub_dataset_in_the_datasets_cache_reads_offline_by_name(editing_run, tmp_path, monkeypatch):
    """`hf://user/edits` with HF_HUB_OFFLINE=1: the copy an earlier `load_dataset` left in the
    datasets cache, made here by the Parquet builder `load_dataset` uses and laid out as a
    Hub dataset's cache entry (<cache>/<namespace>___<name>/<config>/<version>/<hash>)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    root = editing_run[0]
    files = sorted(str(p) for p in (root / "hub" / "data").iterdir())
    builder = Parquet(
        data_files={"train": files}, dataset_name="edits", hash="0123abcd", cache_dir=str(tmp_path / "prep")
    )
    builder.download_and_prepare()
    cache = tmp_path / "cache"
    shutil.copytree(builder.cache_dir, cache / "user___edits" / "default" / "0.0.0" / "0123abcd")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    assert datasets.config.HF_HUB_OFFLINE
    cfg = DataConfig()
    shards = discover(["hf://user/edits:train"], cfg)
    assert [(s.id, s.format) for s in shards] == [("train-00000-of-00001", "hub")]
    rows = [r for b in read_shard(shards[0], cfg) for r in b.to_pylist()]
    assert sorted((r["key"], r["reason"]) for r in rows) == [
        ("h-broken", QUARANTINED["h-broken"]), ("h-multi", None), ("h-single", None),
    ]  # fmt: skip
    multi = next(r for r in rows if r["key"] == "h-multi")
    assert multi["edit_instruction"] == EDITS["h-multi"][0]
    assert [np.asarray(Image.open(io.BytesIO(b))).tolist() for b in multi["edit_images"]] == [
        np.asarray(picture(s)).tolist() for s in EDITS["h-multi"][1]
    ]
    with pytest.raises(UniloomError, match=r"input hf://user/missing:train: cannot load the dataset"):
        discover(["hf://user/missing"], cfg)


def test_the_tar_reader_keys_members_as_webdataset_does(tmp_path):
    from webdataset.tariterators import base_plus_ext

    names = ["a.png", "a.src.jpg", "dir/b.tgt0.PNG", "dir.v2/c.d.json", "x/y/z.txt"]
    for name in names:
        key, field = split_name(name)
        prefix, suffix = base_plus_ext(name)
        assert (key, field) == (prefix, suffix.lower()), name
    with wds.TarWriter(str(tmp_path / "t.tar")) as sink:
        sink.write({"__key__": "dir.v2/s", "src.png": b"1", "tgt.png": b"2", "txt": b"3"})
    (sample,) = read_tar_file(str(tmp_path / "t.tar"))
    assert (sample.key, sorted(sample.members)) == ("dir.v2/s", ["src.png", "tgt.png", "txt"])


def test_the_data_stage_imports_nothing_of_the_synthetic_corpus():
    """Every module of pipelines/data, and the workflow's data stage, read edit targets from
    the corpus; the benchmark (pipelines/data/bench.py) synthesises its own input."""
    from uniloom.pipelines.workflow_stages import workflow_stages

    sources = Sources()
    folder = sources.path("uniloom.pipelines.data").parent
    modules = [
        f"uniloom.pipelines.data.{p.stem}" for p in folder.glob("*.py") if p.stem not in ("__init__", "bench")
    ]
    assert "uniloom.pipelines.data.images" in modules
    imported = sources.closure(modules)
    (data_stage,) = [s for s in workflow_stages() if s.name == "data"]
    imported += sources.function(data_stage.run)[1]
    assert [m for m in imported if m.startswith("uniloom.pipelines.corpus")] == []
