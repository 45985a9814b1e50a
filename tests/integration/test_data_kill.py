"""SIGKILL the `uniloom data run` driver mid-run: the rerun completes only what was not
committed, and the final rows equal a clean run's (same keys, no duplicates)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from uniloom.pipelines.config import CorpusConfig, load_config
from uniloom.pipelines.corpus.synth import synthesize
from uniloom.pipelines.data.image_tokenizer import save_random_weights
from uniloom.pipelines.data.manifest import Manifest
from uniloom.pipelines.data.runner import run
from uniloom.pipelines.errors import UniloomError

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
