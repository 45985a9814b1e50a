"""The driver's commit and the planner, without Ray: the same stages run in this process
and their blocks reach the committer shuffled, as Ray Data may deliver them."""

import json
import os
import pickle
import posixpath
import random
import shutil
import subprocess
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.config import CorpusConfig, UniloomConfig
from uniloom.pipelines.corpus.synth import synthesize, write_tar
from uniloom.pipelines.data import commit, runner, text_tokenizer
from uniloom.pipelines.data.commit import Committer, OutputSpec, shard_paths, sweep
from uniloom.pipelines.data.dedup import DedupIndex
from uniloom.pipelines.data.fs import open_fs
from uniloom.pipelines.data.image_tokenizer import Encoder, save_random_weights
from uniloom.pipelines.data.manifest import Manifest, output_name
from uniloom.pipelines.data.prepare import Prepare
from uniloom.pipelines.data.runner import prepare_run
from uniloom.pipelines.data.source import read_marked
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train import trainer
from uniloom.pipelines.train.data import find_shards

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
    assert list(last["dedup_against"]) == ["shapes-00000.tar"]
    for entry in shards.values():
        rows = entry["rows"]
        assert rows["read"] == rows["written"] + sum(rows["filtered"].values()) + rows["quarantined"]
    paths = shard_paths(state["manifest"], "shapes-00003.tar")
    assert pq.read_table(paths["quarantine"]).to_pylist()[0]["key"] == "zz-bad"
    assert pq.read_table(paths["filtered"]).to_pylist()[0]["reason"] == "exact_dup"
    first = pq.read_table(shard_paths(state["manifest"], "shapes-00000.tar")["output"])
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
    committed = shard_paths(manifest, "shapes-00001.tar")
    open(f"{manifest.root}/shards/never-committed.tar.0123456789abcdef.parquet", "wb").write(b"partial")
    open(committed["index"].replace(".parquet", "0.parquet"), "wb").write(b"replaced")
    open(f"{manifest.root}/_tmp/abc.parquet", "wb").write(b"partial")
    assert sweep(manifest) == 3
    names = sorted(p.name for p in (Path(manifest.root) / "shards").iterdir())
    assert names == sorted(Path(shard_paths(manifest, sid)["output"]).name for sid in manifest.shards)
    assert all(Path(path).exists() for path in committed.values())


# ------------------------------------------------------------------ crash-safe reprocessing


def local_execute(cfg, todo, text, committer):
    """runner.execute without Ray: the same stages in this process, blocks shuffled."""
    prep = Prepare(cfg.data, cfg.mingtok.image_size, text)
    enc = Encoder(asdict(cfg.mingtok), cfg.data.tokenizer_weights, {}, asdict(cfg.data.exec), "float32")
    blocks = [enc(prep(b)) for s in todo for b in read_marked(s, cfg.data)]
    random.Random(len(blocks)).shuffle(blocks)
    for block in blocks:
        committer.add(block)
    committer.finish()
    return 0.0


def committed_rows(out, storage_options=None) -> list[tuple[str, str, str]]:
    """What training reads: the manifest's output files (train.data.find_shards)."""
    shards = find_shards(out, storage_options or {})
    table = pq.read_table(shards.files, columns=["source", "key", "content_hash"], filesystem=shards.fs)
    return sorted(zip(*(table.column(c).to_pylist() for c in ("source", "key", "content_hash"))))


def files_under(out, storage_options=None) -> list[str]:
    fs, root = open_fs(out, storage_options or {})
    fs.invalidate_cache()
    return sorted(posixpath.relpath(p, root) for p in fs.find(root))


def only_committed_files_left(out, storage_options=None) -> bool:
    """Each table folder holds exactly the manifest's files; no temporary file, log record
    or lease is left."""
    manifest = Manifest.load(out, storage_options or {})
    named = {rel for sid, entry in manifest.shards.items() for rel in commit.entry_files(sid, entry).values()}
    files = files_under(out, storage_options)
    tables = {f for f in files if f.split("/")[0] in commit.TABLES.values()}
    return tables == named and not any(f.startswith(("_tmp/", "_manifest/", "_lock")) for f in files)


def replace_shard(corpus: str, name: str, seed: int) -> None:
    """Shard `name` with other pictures (rendered from another seed), same keys."""
    other = Path(corpus).parent / f"other-{seed}"
    synthesize(CorpusConfig(num=24, shards=3, size=32, seed=seed), other)
    shutil.copy(other / name, Path(corpus) / name)


@pytest.mark.parametrize("kill", ["writing", "recording", "deleting"])
def test_a_reprocess_killed_at_any_point_keeps_a_whole_state_and_a_rerun_recovers(
    setup, tmp_path, monkeypatch, kill
):
    cfg, corpus, out = setup
    monkeypatch.setattr(runner, "execute", local_execute)
    runner.run(cfg, [corpus], out)
    before = committed_rows(out)
    replace_shard(corpus, "shapes-00001.tar", seed=9)
    clean = runner.run(cfg, [corpus], str(tmp_path / "clean"))
    assert clean["errors"] == []
    after = committed_rows(str(tmp_path / "clean"))
    assert after != before

    calls = []

    def killed(original, at):
        def f(*args, **kwargs):
            calls.append(at)
            if len(calls) == 4 or at != "writing":  # before the last of a shard's four files
                raise KeyboardInterrupt(f"killed while {at}")
            return original(*args, **kwargs)

        return f

    target = {
        "writing": (commit, "write_named"),
        "recording": (Manifest, "put"),
        "deleting": (commit, "_delete"),
    }
    owner, name = target[kill]
    with monkeypatch.context() as m:
        m.setattr(owner, name, killed(getattr(owner, name), kill))
        with pytest.raises(KeyboardInterrupt):
            runner.run(cfg, [corpus], out)
    # The committed state is whole: the old rows, or (killed after the record) the new ones.
    assert committed_rows(out) == (after if kill == "deleting" else before)
    manifest = Manifest.load(out, {})
    named = {
        str(Path(p).relative_to(out)) for sid in manifest.shards for p in shard_paths(manifest, sid).values()
    }
    left = {f for f in files_under(out) if f.split("/")[0] in commit.TABLES.values()} - named
    assert left  # what the kill left: the new files, or the replaced ones

    rerun = runner.run(cfg, [corpus], out)
    assert rerun["errors"] == [] and rerun["swept_files"] >= len(left)
    assert rerun["shards"]["processed"] == (0 if kill == "deleting" else 1)
    assert committed_rows(out) == after
    # Nothing else is left: each table folder holds exactly the manifest's files.
    manifest = Manifest.load(out, {})
    named = {
        str(Path(p).relative_to(out)) for sid in manifest.shards for p in shard_paths(manifest, sid).values()
    }
    assert {f for f in files_under(out) if f.split("/")[0] in commit.TABLES.values()} == named
    assert not any(f.startswith(("_tmp/", "_manifest/")) for f in files_under(out))
    assert "_lock.json" not in files_under(out)


def test_a_reprocessed_shard_replaces_its_files_and_a_glob_sees_only_committed_ones(setup, monkeypatch):
    cfg, corpus, out = setup
    monkeypatch.setattr(runner, "execute", local_execute)
    runner.run(cfg, [corpus], out)
    old = shard_paths(Manifest.load(out, {}), "shapes-00002.tar")
    replace_shard(corpus, "shapes-00002.tar", seed=12)
    assert runner.run(cfg, [corpus], out)["shards"]["processed"] == 1
    new = shard_paths(Manifest.load(out, {}), "shapes-00002.tar")
    assert all(not Path(old[k]).exists() and Path(new[k]).exists() for k in ("output", "index"))
    assert new["output"] != old["output"] and Path(new["output"]).name.startswith("shapes-00002.tar.")
    glob = pq.read_table(sorted(str(p) for p in Path(out, "shards").glob("*.parquet")), columns=["key"])
    assert glob.num_rows == sum(e["rows"]["written"] for e in Manifest.load(out, {}).shards.values())


def test_a_version_1_manifest_still_reads_and_moves_to_the_new_layout(setup, monkeypatch):
    cfg, corpus, out = setup
    monkeypatch.setattr(runner, "execute", local_execute)
    runner.run(cfg, [corpus], out)
    rows = committed_rows(out)
    # Rewrite the output as version 1 left it: plain file names, the whole manifest in one file.
    m = Manifest.load(out, {})
    for sid, entry in m.shards.items():
        for kind, rel in entry.pop("files").items():
            os.replace(Path(out, rel), Path(out, commit.TABLES[kind], output_name(sid)))
        entry["output"] = f"shards/{output_name(sid)}"
        entry["dedup_against"] = sorted(entry["dedup_against"])  # owner ids only
    m.data["version"] = 1
    del m.data["log_seq"]
    Path(out, "_manifest.json").write_text(json.dumps(m.data))
    assert committed_rows(out) == rows

    again = runner.run(cfg, [corpus], out)
    assert again["shards"]["processed"] == 0 and again["swept_files"] == 0
    assert committed_rows(out) == rows
    assert json.loads(Path(out, "_manifest.json").read_text())["version"] == 2
    replace_shard(corpus, "shapes-00001.tar", seed=9)
    assert runner.run(cfg, [corpus], out)["shards"]["processed"] == 1
    names = sorted(p.name for p in Path(out, "shards").iterdir())
    assert "shapes-00001.tar.parquet" not in names and "shapes-00000.tar.parquet" in names
    assert len(names) == 4 and committed_rows(out) != rows


def test_a_commit_writes_one_small_record_whatever_the_number_of_shards(tmp_path):
    def entry(i: int) -> dict:
        return {
            "input_hash": f"{i:016x}",
            "rows": {"read": 8, "written": 8},
            "files": {"output": f"s/{i:08d}"},
        }

    record_bytes = {}
    for n in (10, 5000):
        out = tmp_path / str(n)
        m = Manifest(str(out), {})
        m.shards.update({f"shard-{i:05d}": entry(i) for i in range(n)})
        m.save()
        snapshot, before = (out / "_manifest.json").read_bytes(), set(files_under(out))
        m.put("new", entry(0))
        m.remove("shard-00003")
        assert (out / "_manifest.json").read_bytes() == snapshot  # commits never rewrite it
        records = sorted(set(files_under(out)) - before)
        assert records == ["_manifest/log/000000000001.json", "_manifest/log/000000000002.json"]
        record_bytes[n] = (out / records[0]).stat().st_size
        loaded = Manifest.load(str(out), {})
        assert loaded.shards == m.shards and "new" in loaded.shards and "shard-00003" not in loaded.shards
        loaded.save()  # the end of a run: one snapshot, no records
        assert not any(f.startswith("_manifest/") for f in files_under(out))
        assert Manifest.load(str(out), {}).shards == m.shards
    assert record_bytes[10] == record_bytes[5000]


def test_a_kill_between_snapshot_and_record_deletion_loses_nothing(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    m = Manifest(out, {})
    m.save()
    m.put("a", {"v": 1})
    m.put("b", {"v": 1})
    m.remove("a")
    m.data["inputs"] = ["x"]
    with monkeypatch.context() as patch:
        patch.setattr(m.fs, "rm", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            m.save()
    assert len(list(Path(out, "_manifest/log").iterdir())) == 3  # included in the snapshot
    loaded = Manifest.load(out, {})
    assert loaded.shards == {"b": {"v": 1}} and loaded.seq == 3 and loaded.data["inputs"] == ["x"]
    loaded.put("b", {"v": 2})  # numbered after the snapshot's records
    assert Manifest.load(out, {}).shards == {"b": {"v": 2}}
    loaded.save()
    assert list(Path(out, "_manifest/log").iterdir()) == []
    assert Manifest.load(out, {}).shards == {"b": {"v": 2}}


def test_training_refuses_a_text_tokenizer_its_shards_were_not_made_with(setup):
    cfg, corpus, out = setup
    process(cfg, [corpus], out)
    tok = trainer.text_tokenizer(out, {})
    made_with = {e["stage"]["text_tokenizer"] for e in Manifest.load(out, {}).shards.values()}
    assert made_with == {text_tokenizer.fingerprint(tok)}
    # A second data run with other BPE settings records its new BPE, then dies before any shard.
    cfg.data.bpe_vocab_size = 280
    prepare_run(cfg, [corpus], out)
    with pytest.raises(UniloomError, match="shards were tokenized with text tokenizer"):
        trainer.text_tokenizer(out, {})
    # The recorded file itself replaced.
    cfg.data.bpe_vocab_size = 300
    prepare_run(cfg, [corpus], out)
    recorded = Manifest.load(out, {}).data["text_tokenizer"]["path"]
    other = text_tokenizer.train_bpe(["a completely different corpus"] * 50, 270, 2)
    Path(out, recorded).write_text(other.to_str())
    with pytest.raises(UniloomError, match="its file has fingerprint"):
        trainer.text_tokenizer(out, {})


def test_the_manifest_log_and_sweep_on_s3(s3_server):
    """The same record, load, snapshot and sweep through s3fs (moto's server on 127.0.0.1)."""
    import s3fs

    options = s3_server
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("manifest-bucket")
    out = "s3://manifest-bucket/out"
    m = Manifest(out, options)
    m.save()
    fs.pipe_file("manifest-bucket/out/shards/a.0123456789abcdef.parquet", b"kept")
    fs.pipe_file("manifest-bucket/out/shards/b.0123456789abcdef.parquet", b"never committed")
    m.put("a", {"files": {"output": "shards/a.0123456789abcdef.parquet"}})
    m.put("c", {"files": {}})
    m.remove("c")
    loaded = Manifest.load(out, options)
    assert loaded.shards == {"a": m.shards["a"]} and loaded.seq == 3
    assert sweep(loaded) == 1 and fs.ls("manifest-bucket/out/shards") == [
        "manifest-bucket/out/shards/a.0123456789abcdef.parquet"
    ]
    loaded.save()
    assert fs.find("manifest-bucket/out/_manifest") == []
    assert Manifest.load(out, options).shards == loaded.shards


# ------------------------------------------------------------------------- store faults

FULL_DISK = """
import importlib.util, pickle, resource, signal, sys
spec = importlib.util.spec_from_file_location("commit_tests", sys.argv[1])
tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tests)
tests.runner.execute = tests.local_execute
cfg, corpus, out, limit = pickle.loads(open(sys.argv[2], "rb").read())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
tests.runner.run(cfg, [corpus], out)
"""


def test_a_full_disk_fails_naming_the_file_and_keeps_the_last_good_state(setup, tmp_path, monkeypatch):
    """A real write failure (EFBIG, the same path as ENOSPC): the run reprocesses a shard in
    a process that may write no file over 32 KiB, so the shard's output (about 90 KiB)
    cannot be written while the manifest's records can."""
    cfg, corpus, out = setup
    monkeypatch.setattr(runner, "execute", local_execute)
    runner.run(cfg, [corpus], out)
    before = committed_rows(out)
    replace_shard(corpus, "shapes-00001.tar", seed=9)
    runner.run(cfg, [corpus], str(tmp_path / "clean"))
    limit = 32 << 10
    assert min(p.stat().st_size for p in Path(out, "shards").glob("shapes-0000[0-2]*")) > limit
    assert Path(out, "_manifest.json").stat().st_size < limit // 2

    args = tmp_path / "args.pickle"
    args.write_bytes(pickle.dumps((cfg, corpus, out, limit)))
    full = subprocess.run(
        [sys.executable, "-c", FULL_DISK, __file__, str(args)], capture_output=True, text=True, timeout=300
    )
    assert full.returncode != 0
    error = full.stderr.strip().splitlines()[-1]
    assert error.startswith(
        f"uniloom.pipelines.errors.UniloomError: cannot write {out}/shards/shapes-00001.tar."
    )
    assert "[Errno 27] File too large" in error and "keeps its last committed state" in error
    assert committed_rows(out) == before  # the manifest and the committed shards read as before
    assert os.listdir(Path(out, "_tmp")) == []  # the partial file is gone: a full disk gets its space back
    assert not Path(out, "_lock.json").exists()  # the lease was given back

    rerun = runner.run(cfg, [corpus], out)
    assert rerun["errors"] == [] and rerun["shards"]["processed"] == 1
    assert committed_rows(out) == committed_rows(str(tmp_path / "clean"))
    assert only_committed_files_left(out)


def test_object_store_errors_are_retried_by_the_client_then_fail_naming_the_file(
    setup, tmp_path, monkeypatch, s3_faults
):
    """Output on S3 (moto) behind a proxy that fails writes of output shards: a few 503
    SlowDown answers are retried by s3fs/botocore with backoff and the run never sees them;
    a store that keeps answering 500 fails the run with one error naming the file, the
    committed state intact, and a rerun once the store is back equals a clean run."""
    import s3fs

    cfg, corpus, _ = setup
    monkeypatch.setattr(runner, "execute", local_execute)
    options, faults = s3_faults
    s3fs.S3FileSystem(**options).mkdir("faults-bucket")
    out = "s3://faults-bucket/out"
    cfg.data.storage_options = options
    faults.fail("PUT", "/faults-bucket/out/shards/", 503, "SlowDown", times=2)
    assert runner.run(cfg, [corpus], out)["errors"] == []
    assert faults.failed == 2
    before = committed_rows(out, options)
    assert len(before) == 24

    replace_shard(corpus, "shapes-00001.tar", seed=9)
    faults.fail("PUT", "/faults-bucket/out/shards/", 500, "InternalError")
    with pytest.raises(UniloomError) as failed:
        runner.run(cfg, [corpus], out)
    assert str(failed.value).startswith(f"cannot write {out}/shards/shapes-00001.tar.")
    assert "injected InternalError" in str(failed.value)
    assert faults.failed >= 5  # botocore's attempts
    faults.clear()
    assert committed_rows(out, options) == before

    rerun = runner.run(cfg, [corpus], out)
    assert rerun["errors"] == [] and rerun["shards"]["processed"] == 1
    cfg.data.storage_options = {}
    runner.run(cfg, [corpus], str(tmp_path / "clean"))
    assert committed_rows(out, options) == committed_rows(str(tmp_path / "clean"))
    assert only_committed_files_left(out, options)
