"""The data stage on real Ray Data: a mixed png/jpg corpus with a broken shard, outputs
read back by three readers, and incremental reruns (nothing changed; one shard changed
and one removed), with `uniloom data status` agreeing."""

import json
import os
import shutil

import numpy as np
import pytest

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.config import CorpusConfig, UniloomConfig
from uniloom.pipelines.corpus.synth import photo_captions, synthesize, write_photos
from uniloom.pipelines.data.image_tokenizer import save_random_weights
from uniloom.pipelines.data.runner import run

pytestmark = pytest.mark.integration

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip


def mtimes(out) -> dict[str, int]:
    folder = os.path.join(out, "shards")
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def first(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("data")
    synthesize(CorpusConfig(num=40, shards=4, size=48, seed=2), root / "corpus")
    (root / "corpus" / "shapes-00009.tar").write_bytes(b"this is not a tar archive" * 40)
    write_photos(root / "photos")
    cfg = UniloomConfig(mingtok=SMALL, workspace=str(root / "ws"))
    cfg.data.tokenizer_weights = save_random_weights(SMALL, str(root / "mingtok.safetensors"))
    cfg.data.bpe_vocab_size = 400
    cfg.data.exec.encode_batch = 16
    inputs, out = [str(root / "corpus"), str(root / "photos")], str(root / "out")
    return cfg, root, inputs, out, run(cfg, inputs, out)


def test_a_broken_shard_is_reported_by_name_and_the_others_complete(first, report):
    *_, summary = first
    assert summary["shards"] == {"processed": 5, "up_to_date": 0, "removed": 0, "failed": 1}
    (error,) = summary["errors"]
    assert "shapes-00009.tar" in error and "not a readable tar" in error
    rows = summary["rows"]
    assert rows["read"] == 40 + len(photo_captions())
    assert rows["read"] == rows["written"] + sum(rows["filtered"].values()) + rows["quarantined"]
    report(f"first run: {rows} in {summary['seconds']} s")


def test_outputs_are_read_by_ray_data_pyarrow_and_hugging_face_datasets(first):
    import datasets
    import pyarrow.dataset as pads
    import ray

    cfg, _, _, out, summary = first
    n = summary["output_rows"]
    table = pads.dataset(f"{out}/shards").to_table()
    assert table.num_rows == n and len(set(table.column("key").to_pylist())) == n
    assert ray.data.read_parquet(f"{out}/shards").count() == n
    hf = datasets.load_dataset("parquet", data_files=f"{out}/shards/*.parquet", split="train")
    assert hf.num_rows == n
    row = hf[0]
    latents = np.frombuffer(row["latents"], dtype=row["latent_dtype"]).reshape(row["latent_shape"])
    assert latents.shape == (SMALL.num_tokens, 32) and np.isfinite(latents).all()
    photos = table.filter(
        pads.field("source").isin([s for s in set(table.column("source").to_pylist()) if "photos" in s])
    )
    assert photos.num_rows > 0 and set(photos.column("edit_latents").to_pylist()) == {None}
    shapes = table.filter(~pads.field("key").isin(photos.column("key")))
    assert all(e is not None for e in shapes.column("edit_latents").to_pylist())
    assert all(v for v in shapes.column("vqa").to_pylist())


def test_reruns_process_exactly_the_changed_shards(first, cli):
    cfg, root, inputs, out, _ = first
    os.remove(root / "corpus" / "shapes-00009.tar")
    before = mtimes(out)
    again = run(cfg, inputs, out)
    assert again["shards"]["processed"] == 0 and again["shards"]["up_to_date"] == 5
    assert again["ray_startup_s"] == 0 and mtimes(out) == before

    shutil.copy(root / "corpus" / "shapes-00000.tar", root / "corpus" / "shapes-00001.tar")
    os.remove(root / "corpus" / "shapes-00003.tar")
    status = cli("data", "status", out, "--json", env={"PYTHONWARNINGS": "ignore"})
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout.strip().splitlines()[-1])
    assert state["shards"] == {"done": 3, "stale": 1, "missing": 0, "orphaned": 1}
    assert state["details"]["corpus/shapes-00001.tar"]["reason"] == "input changed"

    third = run(cfg, inputs, out)
    assert third["reasons"] == {"corpus/shapes-00001.tar": "input changed"}
    assert third["shards"] == {"processed": 1, "up_to_date": 3, "removed": 1, "failed": 0}
    # Shard 1 is now a copy of shard 0: every one of its pictures is an exact duplicate.
    assert third["rows"]["filtered"] == {"exact_dup": 10} and third["rows"]["written"] == 0
    after = mtimes(out)  # files are named <shard>.<content hash>.parquet
    assert not any(k.startswith("corpus__shapes-00003.tar.") for k in after)
    changed = {k for k in after if after[k] != before.get(k)}
    assert {k.rsplit(".", 2)[0] for k in changed} == {"corpus__shapes-00001.tar"} and len(changed) == 1
