"""`uniloom bench train` end to end: shards from the real data stage, then alternating
windows of the plain loop and of Ray Train + DeepSpeed with the experts over 2 workers,
the full side stepped by the loop a run takes (its logging and metric reductions)."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_bench_train_times_the_real_loop_and_counts_model_flops(cli, tmp_path, report):
    from uniloom.pipelines import progress
    from uniloom.pipelines.config import load_config
    from uniloom.pipelines.model_info import parameter_counts
    from uniloom.pipelines.train.flops import TrainingFlops

    proc = cli("bench", "train", "--images", "64", "--steps", "2", "--rounds", "1", "--work", str(tmp_path),
               "--profile", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["workers"], out["expert_parallel"], out["timed_steps_per_side"]) == (2, 2, 2)
    # the full side ran the run's loop: its last step logged, reduced over both workers
    reports = [
        r for r in map(progress.parse, proc.stderr.splitlines()) if r is not None and r.stage == "train"
    ]
    assert reports and reports[-1].figures["stage"] == "bench 4/4" and "loss" in reports[-1].figures
    assert out["full_tokens_per_s_per_worker"] > 0 and out["plain_tokens_per_s"] > 0
    # FLOPs per token of the batches' own mix: the backbone's for every token, and between
    # nothing and every extra once per token for the text targets, image slots and targets
    flops = TrainingFlops.of(load_config("tiny"))
    assert out["flops_per_tok_backbone"] == round(flops.per_token)
    most = flops.per_token + flops.per_text_target + flops.per_image_slot + flops.per_image_target
    for side in ("full", "plain"):
        per_token = out[f"{side}_model_flops_per_tok"]
        assert flops.per_token < per_token < most, (side, per_token)  # images are in the mix
    assert out["full_tflops_per_s_per_worker"] > 0
    # On a CPU: no dense bf16 peak to divide by, said rather than invented; the device is
    # the worker's own CPU
    assert out["mfu"].startswith("not applicable on a CPU") and "full_mfu" not in out
    assert out["device"] and out["peak_memory_of"] == "worker RSS, every side"
    # A worker holds two copies of the model's fp32 weights (the plain loop's and the engine's)
    # --profile: rank 0's plain loop, one more window, by op: the matmuls are a share of it
    assert out["profile_steps"] == 2 and 0 < out["profile_matmul_share"] < 1
    assert out["profile_top"] and all(name.startswith("aten::") for name, _, _ in out["profile_top"])
    counts = parameter_counts(load_config("tiny"))
    assert out["peak_memory_gib"] > 2 * 4 * (counts["total"] + counts["mingtok_total"]) / 2**30
    report(f"2 steps per side: ratio {out['ratio']}, per CPU-second {out['ratio_cpu']}, "
           f"{out['full_model_flops_per_tok'] / 1e6:.2f} MFLOP per token, "
           f"{out['full_tflops_per_s_per_worker'] * 1e3:.2f} GFLOP/s per worker, peak RSS "
           f"{out['peak_memory_gib']:.2f} GiB, matmul share {out['profile_matmul_share']}")  # fmt: skip
