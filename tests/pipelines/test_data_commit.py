"""The driver's commit and the planner, without Ray: the same stages run in this process
and their blocks reach the committer shuffled, as Ray Data may deliver them."""

import random
import shutil
import tarfile
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.config import CorpusConfig, UniloomConfig
from uniloom.pipelines.corpus.synth import synthesize, write_tar
from uniloom.pipelines.data import text_tokenizer
from uniloom.pipelines.data.commit import Committer, OutputSpec, shard_paths, sweep
from uniloom.pipelines.data.dedup import DedupIndex
from uniloom.pipelines.data.image_tokenizer import Encoder, save_random_weights
from uniloom.pipelines.data.prepare import Prepare
from uniloom.pipelines.data.runner import prepare_run
from uniloom.pipelines.data.source import read_marked

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip


@pytest.fixture
def setup(tmp_path):
    corpus = tmp_path / "corpus"
    paths = synthesize(CorpusConfig(num=24, shards=3, size=32, seed=5), corpus)
    # A fourth shard repeating one picture of the first under another key, plus a broken row.
    with tarfile.open(paths[0]) as tar:
        png = tar.extractfile("0005-00000002.png").read()
    write_tar(
        corpus / "shapes-00003.tar",
        [("zz-copy", {"png": png, "txt": b"copy"}), ("zz-bad", {"png": b"x", "txt": b"bad"})],
    )
    cfg = UniloomConfig(mingtok=SMALL)
    cfg.data.tokenizer_weights = save_random_weights(SMALL, str(tmp_path / "w.safetensors"))
    cfg.data.bpe_vocab_size = 300
    return cfg, str(corpus), str(tmp_path / "out")


def process(cfg, inputs, out, seed=0, stop_after=None):
    """prepare_run + the stages in this process + the committer: one run without Ray."""
    state = prepare_run(cfg, inputs, out)
    cfg, p, stage = state["cfg"], state["plan"], state["stage"]
    prep = Prepare(cfg.data, cfg.mingtok.image_size, state["text"])
    enc = Encoder(asdict(cfg.mingtok), cfg.data.tokenizer_weights, {}, asdict(cfg.data.exec), "float32")
    blocks = [enc(prep(b)) for s in p.todo for b in read_marked(s, cfg.data)]
    random.Random(seed).shuffle(blocks)
    spec = OutputSpec(32, (SMALL.num_tokens, 32), "float32", stage.text_tokenizer, stage.image_tokenizer)
    committer = Committer(
        state["manifest"], p.todo, state["hashes"], stage, DedupIndex(cfg.data.filters), spec
    )
    for block in blocks[:stop_after]:
        committer.add(block)
    if stop_after is None:
        committer.finish()
    return state, committer


def test_shards_commit_in_id_order_with_exact_accounting_and_dedup_owner(setup):
    cfg, corpus, out = setup
    state, committer = process(cfg, [corpus], out)
    assert committer.committed == [f"shapes-0000{i}.tar" for i in range(4)]
    shards = state["manifest"].shards
    last = shards["shapes-00003.tar"]
    assert last["rows"] == {"read": 2, "written": 0, "filtered": {"exact_dup": 1}, "quarantined": 1}
    assert last["dedup_against"] == ["shapes-00000.tar"]
    for entry in shards.values():
        rows = entry["rows"]
        assert rows["read"] == rows["written"] + sum(rows["filtered"].values()) + rows["quarantined"]
    paths = shard_paths(state["manifest"].root, "shapes-00003.tar")
    assert pq.read_table(paths["quarantine"]).to_pylist()[0]["key"] == "zz-bad"
    assert pq.read_table(paths["filtered"]).to_pylist()[0]["reason"] == "exact_dup"
    first = pq.read_table(shard_paths(state["manifest"].root, "shapes-00000.tar")["output"])
    assert first.column("key").to_pylist() == sorted(first.column("key").to_pylist())
    assert first.num_rows == 8 and set(first.column("latent_dtype").to_pylist()) == {"float32"}
    tok = text_tokenizer.load_from_output(out)  # what training loads beside the shards
    assert text_tokenizer.fingerprint(tok) == first.column("text_tokenizer")[0].as_py()


def test_a_shard_commits_only_when_its_earlier_shards_have(setup):
    cfg, corpus, out = setup
    state, committer = process(cfg, [corpus], out, seed=1, stop_after=3)
    done = committer.committed
    assert done == sorted(done) and done == [f"shapes-0000{i}.tar" for i in range(len(done))]
    assert set(state["manifest"].shards) == set(done)


def test_planner_redoes_changed_shards_and_the_shards_that_lost_duplicates_to_them(setup, tmp_path):
    cfg, corpus, out = setup
    process(cfg, [corpus], out)
    state = prepare_run(cfg, [corpus], out)
    assert state["plan"].todo == [] and len(state["plan"].done) == 4
    # Shard 0 changes: shard 3, which lost its copy to shard 0, must be redone too.
    shutil.copy(f"{corpus}/shapes-00001.tar", f"{corpus}/shapes-00000.tar")
    p = prepare_run(cfg, [corpus], out)["plan"]
    assert p.reasons == {"shapes-00000.tar": "input changed", "shapes-00003.tar": "dedup owner changed"}
    cfg.data.filters.min_side = 16
    p = prepare_run(cfg, [corpus], out)["plan"]
    assert p.reasons["shapes-00001.tar"] == "config changed"


def test_sweep_removes_temporary_and_uncommitted_files_only(setup):
    cfg, corpus, out = setup
    state, _ = process(cfg, [corpus], out)
    manifest = state["manifest"]
    stray = shard_paths(manifest.root, "never-committed.tar")["output"]
    open(stray, "wb").write(b"partial")
    open(f"{manifest.root}/_tmp/abc.parquet", "wb").write(b"partial")
    assert sweep(manifest) == 2
    assert len(list((Path(manifest.root) / "shards").iterdir())) == 4
