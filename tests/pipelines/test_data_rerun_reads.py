"""What a rerun reads of its inputs: nothing when no file's metadata moved; only the
touched files when some did (and a touched file with the same bytes is not reprocessed);
and a changed file is found even when its size and mtime were put back."""

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileOpener

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.config import CorpusConfig, UniloomConfig
from uniloom.pipelines.corpus.synth import synthesize
from uniloom.pipelines.data import runner
from uniloom.pipelines.data.commit import Committer, OutputSpec
from uniloom.pipelines.data.dedup import DedupIndex
from uniloom.pipelines.data.image_tokenizer import Encoder, save_random_weights
from uniloom.pipelines.data.prepare import Prepare
from uniloom.pipelines.data.runner import prepare_run
from uniloom.pipelines.data.source import read_marked

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip


def config(tmp_path) -> UniloomConfig:
    cfg = UniloomConfig(mingtok=SMALL)
    cfg.data.tokenizer_weights = save_random_weights(SMALL, str(tmp_path / "w.safetensors"))
    cfg.data.bpe_vocab_size = 300
    return cfg


def process(cfg: UniloomConfig, inputs: list[str], out: str) -> list[str]:
    """One run with the stages in this process (no Ray); returns the committed shards."""
    state = prepare_run(cfg, inputs, out)
    run_cfg, p, stage = state["cfg"], state["plan"], state["stage"]
    prep = Prepare(run_cfg.data, 32, state["text"])
    enc = Encoder(asdict(SMALL), run_cfg.data.tokenizer_weights, {}, asdict(run_cfg.data.exec), "float32")
    spec = OutputSpec(32, (SMALL.num_tokens, 32), "float32", stage.text_tokenizer, stage.image_tokenizer)
    committer = Committer(
        state["manifest"], p.todo, state["hashes"], stage, DedupIndex(cfg.data.filters), spec
    )
    for shard in p.todo:
        for block in read_marked(shard, run_cfg.data):
            committer.add(enc(prep(block)))
    committer.finish()
    state["manifest"].save()
    return committer.committed


@pytest.fixture
def made(tmp_path):
    """A 4-shard local corpus processed once."""
    corpus = tmp_path / "corpus"
    synthesize(CorpusConfig(num=16, shards=4, size=32, seed=5), corpus)
    cfg, out = config(tmp_path), str(tmp_path / "out")
    assert process(cfg, [str(corpus)], out) == [f"shapes-0000{i}.tar" for i in range(4)]
    return cfg, str(corpus), out


@pytest.fixture
def reads(monkeypatch):
    """Bytes read through fsspec's local files, by path: wraps every read method."""
    counts: Counter[str] = Counter()
    for name in ("read", "readline", "readinto", "read1", "readinto1"):
        original = getattr(LocalFileOpener, name, None)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            out = _original(self, *args, **kwargs) if _original else getattr(self.f, _name)(*args, **kwargs)
            counts[str(self.path)] += out if isinstance(out, int) else len(out)
            return out

        monkeypatch.setattr(LocalFileOpener, name, counted, raising=False)
    return counts


def corpus_bytes(reads: Counter, corpus: str) -> dict[str, int]:
    return {Path(p).name: n for p, n in reads.items() if p.startswith(corpus) and n}


def test_a_no_op_rerun_reads_no_input_byte_and_a_touched_file_is_hashed_not_redone(made, reads):
    cfg, corpus, out = made
    reads.clear()
    summary = runner.run(cfg, [corpus], out)  # nothing to process: no Ray
    assert summary["shards"] == {"processed": 0, "up_to_date": 4, "removed": 0, "failed": 0}
    assert corpus_bytes(reads, corpus) == {}

    touched = Path(corpus) / "shapes-00001.tar"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    reads.clear()
    summary = runner.run(cfg, [corpus], out)
    assert summary["shards"]["processed"] == 0 and summary["shards"]["up_to_date"] == 4
    assert corpus_bytes(reads, corpus) == {touched.name: touched.stat().st_size}  # hashed, once
    reads.clear()
    state = prepare_run(cfg, [corpus], out)  # the run recorded the new metadata
    assert state["plan"].todo == [] and state["plan"].touched == {}
    assert corpus_bytes(reads, corpus) == {}


def test_a_changed_file_is_redone_even_with_its_size_and_mtime_put_back(made, reads):
    cfg, corpus, out = made
    shard = Path(corpus) / "shapes-00002.tar"
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # the end-of-archive padding: same size, other bytes
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert shard.stat().st_size == before.st_size and shard.stat().st_mtime_ns == before.st_mtime_ns
    reads.clear()
    p = prepare_run(cfg, [corpus], out)["plan"]
    assert p.reasons == {"shapes-00002.tar": "input changed"}
    assert set(corpus_bytes(reads, corpus)) == {shard.name}

    # A renamed copy of a shard is a new shard with a new name; the original disappears.
    shutil.move(Path(corpus) / "shapes-00001.tar", Path(corpus) / "shapes-00009.tar")
    p = prepare_run(cfg, [corpus], out)["plan"]
    assert p.reasons["shapes-00009.tar"] == "new" and p.removed == ["shapes-00001.tar"]


def test_bench_data_scale_prints_a_row_per_shard_count(cli, tmp_path):
    out = cli(
        "bench", "data", "--scale", "--shards", "4", "--shards", "12", "--work", str(tmp_path), "--json"
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["shards"] for r in result["sizes"]] == [4, 12]
    for r in result["sizes"]:  # the bench raises if a no-op rerun processed anything
        assert r["noop_rerun_s"] > 0 and r["commit_ms"] > 0
    table = cli("bench", "data", "--scale", "--shards", "3", "--work", str(tmp_path))
    assert table.returncode == 0, table.stderr
    head, row = table.stdout.strip().splitlines()
    assert head.split()[:3] == ["N", "no-op", "s"] and row.split()[0] == "3"
    twice = cli("bench", "data", "--shards", "3", "--shards", "4")
    assert twice.returncode == 2 and "--shards is given once, except with --scale" in twice.stderr


@pytest.fixture(scope="module")
def s3(s3_server):
    import s3fs

    s3fs.S3FileSystem(**s3_server).mkdir("rerun-bucket")
    return s3_server


def test_on_s3_a_rerun_reads_no_object_and_a_rewritten_object_counts_by_its_etag(s3, tmp_path, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    synthesize(CorpusConfig(num=9, shards=3, size=32, seed=7), tmp_path / "corpus")
    for path in sorted((tmp_path / "corpus").glob("*.tar")):
        fs.pipe_file(f"rerun-bucket/corpus/{path.name}", path.read_bytes())
    cfg, corpus, out = config(tmp_path), "s3://rerun-bucket/corpus", str(tmp_path / "out")
    cfg.data.storage_options = s3
    assert len(process(cfg, [corpus], out)) == 3
    fetched: Counter[str] = Counter()
    original = s3fs.core.S3File._fetch_range

    def counted(self, start, end):
        data = original(self, start, end)
        fetched[self.path] += len(data)
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
    fs.invalidate_cache()
    p = prepare_run(cfg, [corpus], out)["plan"]
    assert p.todo == [] and p.touched == {} and not fetched

    time.sleep(1.1)  # LastModified has whole seconds
    same = tmp_path / "corpus" / "shapes-00001.tar"
    fs.pipe_file("rerun-bucket/corpus/shapes-00001.tar", same.read_bytes())  # new object, same bytes
    fs.pipe_file(
        "rerun-bucket/corpus/shapes-00002.tar", (tmp_path / "corpus" / "shapes-00000.tar").read_bytes()
    )
    fs.invalidate_cache()
    p = prepare_run(cfg, [corpus], out)["plan"]
    assert p.reasons == {"shapes-00002.tar": "input changed"} and set(p.touched) == {"shapes-00001.tar"}
    assert not fetched  # the ETags told
