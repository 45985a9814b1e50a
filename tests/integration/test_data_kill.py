"""SIGKILL the `uniloom data run` driver mid-run: the rerun completes only what was not
committed, and the final rows equal a clean run's (same keys, no duplicates). SIGKILL an
encoder actor while changed shards are reprocessed: Ray Data restarts it and retries its
batch, and the output equals a clean run's, row for row."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.config import CorpusConfig, UniloomConfig, load_config
from uniloom.pipelines.corpus.synth import synthesize
from uniloom.pipelines.data.commit import TABLES, entry_files
from uniloom.pipelines.data.image_tokenizer import save_random_weights
from uniloom.pipelines.data.manifest import Manifest
from uniloom.pipelines.data.runner import run
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train.data import find_shards

pytestmark = pytest.mark.integration

SHARDS = 16
UNILOOM = str(Path(sys.executable).with_name("uniloom"))


def committed(out: Path) -> int:
    try:
        return len(Manifest.load(str(out), {}).shards)
    except (FileNotFoundError, UniloomError):  # not started yet, or compacting as we read
        return 0


def rows(out: Path) -> list[tuple[str, str]]:
    table = pads.dataset(str(out / "shards")).to_table(columns=["source", "key"])
    return sorted(zip(table.column("source").to_pylist(), table.column("key").to_pylist()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    synthesize(CorpusConfig(num=SHARDS * 24, shards=SHARDS, size=64, seed=11), root / "corpus")
    cfg = load_config("tiny")
    weights = save_random_weights(cfg.mingtok, str(root / "mingtok.safetensors"))
    config = {
        "workspace": str(root / "ws"),
        "data": {"tokenizer_weights": weights, "exec": {"encode_batch": 16, "block_rows": 8}},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def data_run(root: Path, out: Path, log: Path) -> subprocess.Popen:
    args = [UNILOOM, "data", "run", "--input", str(root / "corpus"), "--output", str(out)]
    args += ["--config", str(root / "config.yaml"), "--json"]
    with log.open("w") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)


def tail(log: Path) -> str:
    return "\n".join(log.read_text().splitlines()[-15:])


def test_a_killed_run_loses_and_duplicates_nothing(setup, ray_local, report):
    root, out = setup, setup / "out"
    proc = data_run(root, out, root / "killed.log")
    deadline = time.monotonic() + 600  # generous: a loaded 2-core machine starts Ray slowly
    while committed(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = committed(out)
    time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the Ray processes that driver started
    assert 3 <= at_kill < SHARDS, f"killed at {at_kill} of {SHARDS} shards:\n{tail(root / 'killed.log')}"

    again = data_run(root, out, root / "rerun.log")
    stdout, _ = again.communicate(timeout=900)
    assert again.returncode == 0, tail(root / "rerun.log")
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["errors"] == []
    assert summary["shards"]["up_to_date"] == at_kill
    assert summary["shards"]["processed"] == SHARDS - at_kill
    assert "its process is gone" in (root / "rerun.log").read_text()  # the dead driver's lease

    clean_out = root / "clean"
    cfg = load_config("tiny", root / "config.yaml")
    clean = run(cfg, [str(root / "corpus")], str(clean_out))
    assert clean["shards"]["processed"] == SHARDS
    resumed, fresh = rows(out), rows(clean_out)
    assert len(set(resumed)) == len(resumed) == summary["output_rows"]
    assert resumed == fresh
    report(
        f"killed after {at_kill}/{SHARDS} shards; rerun processed {SHARDS - at_kill}; {len(fresh)} rows match"
    )


SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip


def encoder_actors() -> list[psutil.Process]:
    """This session's Ray Data encoder actors (the Ray instance ray_local started from this
    process: its workers descend from it), by the title Ray gives their processes."""
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if (p.cmdline() or [""])[0].startswith("ray::MapWorker(") and "Encoder" in p.cmdline()[0]:
                found.append(p)
    return found


def kill_an_encoder_mid_batch(stop: threading.Event, killed: list[str]) -> None:
    """SIGKILL the first encoder actor seen running a batch (its title ends in .submit)."""
    while not stop.is_set():
        for actor in encoder_actors():
            with contextlib.suppress(psutil.Error):
                if actor.cmdline()[0].endswith(".submit"):
                    actor.kill()
                    killed.append(f"pid {actor.pid}")
                    return
        time.sleep(0.005)


def all_rows(out: Path) -> list[dict]:
    """Every column of every committed row, in a stable order."""
    shards = find_shards(str(out), {})
    return sorted(pq.read_table(shards.files).to_pylist(), key=lambda r: (r["source"], r["key"]))


def test_a_killed_encoder_actor_is_restarted_and_the_reprocess_equals_a_clean_run(
    tmp_path, ray_local, report
):
    corpus = tmp_path / "corpus"
    synthesize(CorpusConfig(num=32, shards=4, size=32, seed=21), corpus)
    cfg = UniloomConfig(mingtok=SMALL)
    cfg.data.tokenizer_weights = save_random_weights(SMALL, str(tmp_path / "w.safetensors"))
    cfg.data.bpe_vocab_size = 300
    cfg.data.exec.block_rows = cfg.data.exec.encode_batch = 2  # many small batches: one is always running
    out = tmp_path / "out"
    assert run(cfg, [str(corpus)], str(out))["shards"]["processed"] == 4
    synthesize(CorpusConfig(num=32, shards=4, size=32, seed=22), tmp_path / "other")
    for name in ("shapes-00001.tar", "shapes-00002.tar"):
        shutil.copy(tmp_path / "other" / name, corpus / name)

    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=kill_an_encoder_mid_batch, args=(stop, killed), daemon=True)
    watcher.start()
    try:
        reprocess = run(cfg, [str(corpus)], str(out))
    finally:
        stop.set()
        watcher.join()
    assert killed, "no encoder actor was seen running a batch"
    assert reprocess["errors"] == [] and reprocess["shards"]["processed"] == 2

    manifest = Manifest.load(str(out), {})
    # The clean run tokenizes with the BPE the first run trained (a rerun keeps it)
    cfg.data.text_tokenizer = str(out / manifest.data["text_tokenizer"]["path"])
    clean = run(cfg, [str(corpus)], str(tmp_path / "clean"))
    assert clean["shards"]["processed"] == 4
    assert all_rows(out) == all_rows(tmp_path / "clean")
    named = {rel for sid, entry in manifest.shards.items() for rel in entry_files(sid, entry).values()}
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {f for f in files if f.split("/")[0] in TABLES.values()} == named
    assert not any(f.startswith(("_tmp/", "_manifest/", "_lock")) for f in files)
    report(
        f"encoder actor {killed[0]} killed mid-batch; the reprocess of 2 shards completed and equals a clean run"
    )
