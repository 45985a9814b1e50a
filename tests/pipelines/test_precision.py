"""`precision: auto`: bf16 on CUDA, on a CPU only where it is measured faster (timings
injected here), cached per machine, logged once, recorded for MLflow."""

from __future__ import annotations

import json

import pytest
import torch

from uniloom.pipelines import precision
from uniloom.pipelines.precision import Timing

SLOW_BF16 = Timing(fp32_ms=7.6, bf16_ms=39.0, measured="2026-01-01 00:00 UTC")  # an AVX2-only CPU
FAST_BF16 = Timing(fp32_ms=7.6, bf16_ms=5.0, measured="2026-01-01 00:00 UTC")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fresh process on an empty cache; returns the list of timings taken."""
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(precision, "_TIMINGS", {})
    taken: list[Timing] = []

    def timed(result: Timing):
        monkeypatch.setattr(precision, "measure", lambda: taken.append(result) or result)

    timed(SLOW_BF16)
    return taken, timed


def test_auto_picks_fp32_where_bf16_is_slower_and_bf16_where_it_is_faster(machine, monkeypatch, capsys):
    taken, timed = machine
    assert precision.resolve("auto", "cpu") == "fp32"
    assert precision.resolve("auto", torch.device("cpu")) == "fp32"
    assert len(taken) == 1  # measured once per process
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["precision auto -> fp32 (cpu: bf16 5.1x slower, measured 2026-01-01 00:00 UTC)"]
    monkeypatch.setenv(precision.CACHE_ENV, str(precision.cache_file().parent / "other"))
    monkeypatch.setattr(precision, "_TIMINGS", {})
    timed(FAST_BF16)
    assert precision.resolve("auto", "cpu") == "bf16"
    assert "precision auto -> bf16 (cpu: bf16 1.5x faster" in capsys.readouterr().err


def test_the_cache_answers_the_next_process_and_is_keyed_by_machine(machine, monkeypatch):
    taken, _ = machine
    assert precision.resolve("auto", "cpu") == "fp32"
    monkeypatch.setattr(precision, "_TIMINGS", {})  # a new process on the same machine
    assert precision.resolve("auto", "cpu") == "fp32" and len(taken) == 1
    entries = json.loads(precision.cache_file().read_text())
    assert list(entries) == [precision.machine_key()]
    assert entries[precision.machine_key()]["bf16_ms"] == 39.0
    monkeypatch.setattr(precision, "_cpuinfo", lambda: ("Other CPU", {"avx512f", "avx512_bf16", "sse2"}))
    precision.resolve("auto", "cpu")
    assert len(taken) == 2  # another machine measures for itself
    assert "Other CPU | avx512f,avx512_bf16 | torch" in precision.machine_key()
    assert len(json.loads(precision.cache_file().read_text())) == 2


def test_an_unreadable_cache_is_measured_again(machine):
    taken, _ = machine
    precision.cache_file().write_text("{half a fi")
    assert precision.resolve("auto", "cpu") == "fp32" and len(taken) == 1
    assert precision.machine_key() in json.loads(precision.cache_file().read_text())


def test_explicit_values_pass_through_and_cuda_is_bf16_without_measuring(machine):
    taken, _ = machine
    for device in ("cpu", "cuda", torch.device("cuda", 0)):
        assert precision.resolve("fp32", device) == "fp32"
        assert precision.resolve("bf16", device) == "bf16"
    assert precision.resolve("auto", torch.device("cuda", 0)) == "bf16"
    assert precision.resolve("auto", "cuda") == "bf16"
    assert taken == []
    with pytest.raises(ValueError, match="fp16"):
        precision.resolve("fp16", "cpu")


def test_autocast_computes_in_the_resolved_precision(machine):
    _, timed = machine
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with precision.autocast("auto", "cpu"):
        assert (x @ w).dtype == torch.float32  # bf16 measured slower here
    with precision.autocast("bf16", "cpu"):
        assert (x @ w).dtype == torch.bfloat16
    with precision.autocast("fp32", "cpu"):
        assert (x @ w).dtype == torch.float32


def test_tags_record_the_choice_the_request_and_the_measurement(machine):
    assert precision.tags("tokenizer", "auto", "cpu") == {
        "precision.tokenizer": "fp32",
        "precision.tokenizer.requested": "auto",
        "precision.tokenizer.reason": "cpu: bf16 5.1x slower, measured 2026-01-01 00:00 UTC",
    }
    assert precision.tags("train", "bf16", "cuda") == {
        "precision.train": "bf16",
        "precision.train.requested": "bf16",
    }


def test_bf16_within_timing_noise_keeps_fp32():
    assert Timing(fp32_ms=10.0, bf16_ms=9.5, measured="").choice == "fp32"
    assert Timing(fp32_ms=10.0, bf16_ms=8.5, measured="").choice == "bf16"


def test_the_measurement_runs_in_one_thread_and_restores_the_count():
    seen = []
    before = torch.get_num_threads()
    original = torch.nn.Linear.forward
    try:
        torch.nn.Linear.forward = lambda self, x: seen.append(torch.get_num_threads()) or original(self, x)
        precision.measure(repeats=1)
    finally:
        torch.nn.Linear.forward = original
    assert set(seen) == {1} and torch.get_num_threads() == before
