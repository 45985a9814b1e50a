"""`uniloom bench train` end to end: shards from the real data stage, then alternating
windows of the plain loop and of Ray Train + DeepSpeed with the experts over 2 workers."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_bench_train_reports_the_ratio_and_its_lockstep_ceiling(cli, tmp_path, report):
    proc = cli("bench", "train", "--images", "64", "--steps", "2", "--rounds", "1", "--work", str(tmp_path),
               "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["workers"], out["expert_parallel"], out["timed_steps_per_side"]) == (2, 2, 2)
    assert out["full_tokens_per_s_per_worker"] > 0 and out["plain_tokens_per_s"] > 0
    assert out["ratio"] == pytest.approx(
        out["full_tokens_per_s_per_worker"] / out["plain_tokens_per_s"], abs=1e-3
    )
    assert 0 < out["lockstep_ceiling"] <= 1
    assert 1 <= out["expert_rank_load"] <= 2  # busiest of 2 ranks over the mean
    report(f"2 steps per side: ratio {out['ratio']}, per CPU-second {out['ratio_cpu']}, "
           f"lock-step ceiling {out['lockstep_ceiling']}, expert rank load {out['expert_rank_load']}")  # fmt: skip
