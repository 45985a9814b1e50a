"""The runner's path after planning, without Ray (the stages run in this process): a redone
shard that fails to read keeps its previous output only while that output agrees with what
the run committed (reruns where a dedup owner, or a shard that lost to one, fails); and the
paths discovery leaves out, counted by reason for the run summary."""

import copy
import shutil
import tarfile
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.config import CorpusConfig, UniloomConfig
from uniloom.pipelines.corpus.synth import synthesize, write_tar
from uniloom.pipelines.data.commit import Committer, OutputSpec, remove_shard, shard_paths
from uniloom.pipelines.data.discovery import HIDDEN
from uniloom.pipelines.data.image_tokenizer import Encoder, save_random_weights
from uniloom.pipelines.data.manifest import Manifest
from uniloom.pipelines.data.prepare import Prepare
from uniloom.pipelines.data.runner import _load_index, prepare_run, withdraw_stale_failures
from uniloom.pipelines.data.source import read_marked

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip
COPIED = "0005-00000002"  # a picture of shard 0 that shard 3 repeats as zz-copy


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The corpus and MingTok weights, made once: each test works on a copy of the corpus."""
    root = tmp_path_factory.mktemp("made")
    paths = synthesize(CorpusConfig(num=24, shards=3, size=32, seed=5), root / "corpus")
    with tarfile.open(paths[0]) as tar:
        png = tar.extractfile(f"{COPIED}.png").read()
    write_tar(root / "corpus" / "shapes-00003.tar", [("zz-copy", {"png": png, "txt": b"copy"})])
    return root / "corpus", save_random_weights(SMALL, str(root / "w.safetensors"))


@pytest.fixture
def setup(made, tmp_path):
    corpus = shutil.copytree(made[0], tmp_path / "corpus")
    cfg = UniloomConfig(mingtok=SMALL)
    cfg.data.tokenizer_weights = made[1]
    cfg.data.bpe_vocab_size = 300
    return cfg, corpus, str(tmp_path / "out")


def rerun(cfg, corpus, out) -> dict:
    """What runner.run does after planning, with the stages in this process."""
    state = prepare_run(cfg, [str(corpus)], out)
    cfg, manifest, p, stage = state["cfg"], state["manifest"], state["plan"], state["stage"]
    for sid in p.removed:
        remove_shard(manifest, sid)
    prep = Prepare(cfg.data, cfg.mingtok.image_size, state["text"])
    enc = Encoder(asdict(cfg.mingtok), cfg.data.tokenizer_weights, {}, asdict(cfg.data.exec), "float32")
    spec = OutputSpec(32, (SMALL.num_tokens, 32), "float32", stage.text_tokenizer, stage.image_tokenizer)
    index = _load_index(cfg.data, manifest, p.done)
    committer = Committer(manifest, p.todo, state["hashes"], stage, index, spec)
    for shard in p.todo:
        for block in read_marked(shard, cfg.data):
            committer.add(enc(prep(block)))
    committer.finish()
    withdrawn = withdraw_stale_failures(manifest, p, committer)
    manifest.save()
    return {"plan": p, "manifest": manifest, "errors": committer.errors, "withdrawn": withdrawn}


def output_hashes(manifest) -> list[str]:
    """content_hash of every output row of every committed shard."""
    return [
        h
        for sid in sorted(manifest.shards)
        for h in pq.read_table(shard_paths(manifest, sid)["output"]).column("content_hash").to_pylist()
    ]


def test_a_failed_owner_whose_losers_were_recomputed_is_withdrawn(setup):
    """Shard 0 changes and no longer reads; shard 3, which had lost its copy to it, is
    redone without shard 0's hashes and keeps the copy. Shard 0's old output, holding the
    same picture, cannot stay beside it."""
    cfg, corpus, out = setup
    first = rerun(cfg, corpus, out)
    assert list(first["manifest"].shards["shapes-00003.tar"]["dedup_against"]) == ["shapes-00000.tar"]
    (corpus / "shapes-00000.tar").write_bytes(b"not a tar any more" * 50)
    second = rerun(cfg, corpus, out)
    assert second["plan"].reasons == {
        "shapes-00000.tar": "input changed",
        "shapes-00003.tar": "dedup owner changed",
    }
    assert len(second["errors"]) == 1 and "not a readable tar" in second["errors"][0]
    assert list(second["withdrawn"]) == ["shapes-00000.tar"]
    assert "duplicate rows that this run's commits kept" in second["withdrawn"]["shapes-00000.tar"]
    manifest = second["manifest"]
    assert "shapes-00000.tar" not in manifest.shards
    assert manifest.shards["shapes-00003.tar"]["rows"]["written"] == 1
    hashes = output_hashes(manifest)
    assert len(hashes) == len(set(hashes)), "a picture is in the output twice"


def test_a_failed_shard_without_conflicts_keeps_its_previous_output(setup):
    cfg, corpus, out = setup
    before = copy.deepcopy(rerun(cfg, corpus, out)["manifest"].shards["shapes-00001.tar"])
    (corpus / "shapes-00001.tar").write_bytes(b"broken")
    second = rerun(cfg, corpus, out)
    assert second["plan"].reasons == {"shapes-00001.tar": "input changed"}
    assert len(second["errors"]) == 1 and second["withdrawn"] == {}
    assert second["manifest"].shards["shapes-00001.tar"] == before


def drop_the_copied_picture(corpus) -> None:
    """Shard 0 replaced by its other pictures: the one shard 3 lost to it is gone."""
    with tarfile.open(corpus / "shapes-00000.tar") as tar:
        kept = [n for n in tar.getnames() if n.endswith(".png") and not n.startswith(COPIED)]
        samples = [(n[:-4], {"png": tar.extractfile(n).read(), "txt": b"again"}) for n in kept]
    write_tar(corpus / "shapes-00000.tar", samples)


def test_a_failed_loser_whose_owner_changed_is_withdrawn_and_redone_later(setup, tmp_path):
    """Shard 3 lost its copy to shard 0; shard 0 is replaced (the picture gone from it)
    while shard 3 fails to read. Kept, shard 3's old entry would stay 'done' once its input
    is back, and the picture would be lost for good."""
    cfg, corpus, out = setup
    rerun(cfg, corpus, out)
    good = tmp_path / "shapes-00003.tar"
    shutil.copy(corpus / "shapes-00003.tar", good)
    drop_the_copied_picture(corpus)
    (corpus / "shapes-00003.tar").write_bytes(b"broken")
    second = rerun(cfg, corpus, out)
    assert second["withdrawn"] == {
        "shapes-00003.tar": "it lost duplicates to shapes-00000.tar, which changed in this run"
    }
    shutil.copy(good, corpus / "shapes-00003.tar")
    third = rerun(cfg, corpus, out)
    assert third["plan"].reasons == {"shapes-00003.tar": "new"}
    assert third["manifest"].shards["shapes-00003.tar"]["rows"]["written"] == 1
    hashes = output_hashes(third["manifest"])
    assert len(hashes) == len(set(hashes)) == 24


@pytest.mark.parametrize("loser", ["readable", "broken"])
def test_a_kill_between_an_owners_commit_and_its_losers_redo_still_redoes_the_loser(
    setup, tmp_path, monkeypatch, loser
):
    """Shard 0 is replaced without the picture shard 3 lost to it; the run commits shard 0
    and is killed before shard 3. The next run must still redo shard 3 (or, when shard 3
    no longer reads, withdraw its old output), or the picture is gone for good."""
    cfg, corpus, out = setup
    first = rerun(cfg, corpus, out)
    owner_index = shard_paths(first["manifest"], "shapes-00000.tar")["index"]
    assert first["manifest"].shards["shapes-00003.tar"]["dedup_against"] == {
        "shapes-00000.tar": str(Path(owner_index).relative_to(out))
    }
    drop_the_copied_picture(corpus)
    put = Manifest.put

    def killed_before_shard_3(self, shard_id, entry):
        if shard_id == "shapes-00003.tar":
            raise KeyboardInterrupt("killed before shard 3's commit")
        put(self, shard_id, entry)

    with monkeypatch.context() as m:
        m.setattr(Manifest, "put", killed_before_shard_3)
        with pytest.raises(KeyboardInterrupt):
            rerun(cfg, corpus, out)
    good = tmp_path / "shapes-00003.tar"
    shutil.copy(corpus / "shapes-00003.tar", good)
    if loser == "readable":
        assert prepare_run(cfg, [str(corpus)], out)["plan"].reasons == {
            "shapes-00003.tar": "dedup owner changed"
        }
    else:
        (corpus / "shapes-00003.tar").write_bytes(b"broken")
        second = rerun(cfg, corpus, out)
        assert second["withdrawn"] == {
            "shapes-00003.tar": "it lost duplicates to shapes-00000.tar, which changed after its commit"
        }
        shutil.copy(good, corpus / "shapes-00003.tar")
    last = rerun(cfg, corpus, out)
    assert last["errors"] == [] and last["manifest"].shards["shapes-00003.tar"]["rows"]["written"] == 1
    hashes = output_hashes(last["manifest"])
    assert len(hashes) == len(set(hashes)) == 24


def test_skipped_paths_are_counted_by_reason_for_the_run_summary(setup):
    cfg, corpus, out = setup
    (corpus / "_old").mkdir()
    (corpus / "shapes-00002.tar").rename(corpus / "_old" / "shapes-00002.tar")
    (corpus / ".shapes-00009.tar.tmp").write_bytes(b"a partial write")
    (corpus / "photo.jpg").write_bytes(b"an image beside the tars")
    state = prepare_run(cfg, [str(corpus)], out)
    assert [s.id for s in state["shards"]] == ["shapes-00000.tar", "shapes-00001.tar", "shapes-00003.tar"]
    assert state["skipped_paths"] == {HIDDEN: 2, "not part of any webdataset shard": 1}
