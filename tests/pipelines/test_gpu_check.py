"""`make gpu-check` before it meets a GPU: its plan fits the 8 minutes and names what
exists, a machine without CUDA is told so and nothing runs, and the runner keeps each step
to its limit and reads the figures the steps print."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from uniloom.pipelines import gpu_check

REPO = Path(__file__).resolve().parents[2]


def test_the_plan_fits_eight_minutes_and_names_what_exists(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    plan = gpu_check.steps()
    assert sum(step.limit_s for step in plan) <= 8 * 60
    assert f"total                limit {sum(s.limit_s for s in plan)} s" in printed
    tests, encode, bench = (step.argv for step in plan)
    assert Path(tests[-1]) == REPO / "tests" / "gpu" and len(list(Path(tests[-1]).glob("test_*.py"))) >= 3
    assert encode[-2:] == ["uniloom.pipelines.gpu_check", "--encode"]
    assert Path(bench[0]).is_file() and bench[1:5] == ["bench", "train", "--preset", "base"]


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
        gpu_check.Step("gpu tests", 60, [py, "-c", "print('3 passed, 2 skipped in 1.0s')"]),
    ]
    lines: list[str] = []
    summary, ok = gpu_check.run(plan, echo=lines.append)
    assert not ok and summary["encoder images/s"] == "TIMED OUT after 2 s"
    assert summary["full_mfu"] == 0.41 and summary["gpu tests"].startswith("3 passed, 2 skipped")
    report = "\n".join(gpu_check.report({**summary, "encode_images_per_s_per_gpu": 1500.0}))
    assert "full_mfu                         0.41  (target >= 0.35: met)" in report
    assert "(target >= 2000: NOT met)" in report
