"""`make gpu-check` before it meets a GPU: its plan names what exists and the figures come
before the tests, a machine without CUDA is told so and nothing runs, and the runner keeps
each step to its limit and the whole plan to the 8 minutes, and reads the figures the steps
print."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from uniloom.pipelines import gpu_check

REPO = Path(__file__).resolve().parents[2]


def test_the_plan_names_what_exists_and_measures_before_it_tests(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert gpu_check.DEADLINE_S == 8 * 60 and "deadline             limit 480 s" in printed
    encode, bench, *tests = (step.argv for step in gpu_check.steps())
    assert encode[-2:] == ["uniloom.pipelines.gpu_check", "--encode"]
    assert Path(bench[0]).is_file() and bench[1:5] == ["bench", "train", "--preset", "base"]
    assert "--profile" in bench and "--compile" not in bench
    compiled = gpu_check.steps(compile=True)[1]  # `--compile`: the bench also times train.compile
    assert "--compile" in compiled.argv and compiled.limit_s > gpu_check.steps()[1].limit_s
    files = sorted(Path(argv[-1]) for argv in tests)
    assert files == sorted((REPO / "tests" / "gpu").glob("test_*.py")) and len(files) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu-check would run")
def test_without_cuda_it_says_so_and_runs_nothing(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "run", lambda *a, **k: pytest.fail("a step ran without CUDA"))
    assert gpu_check.main([]) == gpu_check.NO_CUDA_EXIT
    assert "no CUDA device on this machine; nothing was run" in capsys.readouterr().err
    assert gpu_check.main(["--encode"]) == gpu_check.NO_CUDA_EXIT


def test_each_step_keeps_its_limit_and_its_figures_reach_the_summary():
    py = sys.executable
    plan = [
        gpu_check.Step(
            "bench train (base)", 60, [py, "-c", "print('log line'); print('{\"full_mfu\": 0.41}')"]
        ),
        gpu_check.Step("encoder images/s", 2, [py, "-c", "import time; time.sleep(30)"]),
        gpu_check.Step("gpu tests: x", 60, [py, "-c", "print('== 3 passed, 2 skipped in 1.0s ==')"]),
    ]
    lines: list[str] = []
    summary, ok = gpu_check.run(plan, echo=lines.append)
    assert not ok and summary["encoder images/s"] == "TIMED OUT after 2 s"
    assert summary["full_mfu"] == 0.41 and summary["gpu tests: x"].startswith("3 passed, 2 skipped in 1.0s (")
    report = "\n".join(gpu_check.report({**summary, "encode_images_per_s_per_gpu": 1500.0}))
    assert "full_mfu                         0.41  (target >= 0.35: met)" in report
    assert "(target >= 2000: NOT met)" in report


def test_the_deadline_cuts_the_plan_and_a_timed_out_test_step_says_what_passed():
    py = sys.executable
    verbose = (
        "print('tests/gpu/test_a.py::test_one PASSED'); import sys, time; sys.stdout.flush(); time.sleep(30)"
    )
    plan = [
        gpu_check.Step("gpu tests: a", 60, [py, "-c", verbose]),  # its own limit is past the deadline
        gpu_check.Step("gpu tests: b", 60, [py, "-c", "print('1 passed in 0.1s')"]),
    ]
    start = time.perf_counter()
    summary, ok = gpu_check.run(plan, echo=lambda _: None, deadline_s=3)
    assert time.perf_counter() - start < 20 and not ok
    assert summary["gpu tests: a"] == "TIMED OUT after 3 s (1 passed before: test_one)"
    assert summary["gpu tests: b"] == "NOT RUN: the 3 s deadline was spent"
