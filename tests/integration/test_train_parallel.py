"""Expert parallelism and portable checkpoints on real DeepSpeed engines over gloo (two
processes, no Ray): the sharded experts compute what the single-device model computes, and
a checkpoint written by 2 ranks (ZeRO 1, experts split 2 ways) resumes exactly on 2 ranks
and loads on 1 rank (experts whole, ZeRO partitions merged)."""

import json

import pytest
import torch.multiprocessing as mp
import trainworkers
from localcluster import free_port

pytestmark = pytest.mark.integration


def test_expert_parallel_layers_match_the_single_device_model_with_and_without_shadow_experts():
    mp.spawn(trainworkers.parity, args=(2, free_port()), nprocs=2)


def test_a_two_rank_checkpoint_resumes_exactly_and_loads_on_one_rank(tmp_path, report):
    from uniloom.pipelines.data.image_tokenizer import save_random_weights

    save_random_weights(trainworkers.MINGTOK, str(tmp_path / "mingtok.safetensors"))
    folder = str(tmp_path)
    mp.spawn(trainworkers.save_then_continue, args=(2, free_port(), 1, folder), nprocs=2)
    mp.spawn(trainworkers.resume, args=(2, free_port(), 1, folder), nprocs=2)
    for rank in range(2):
        continued = json.loads((tmp_path / f"continued-2-{rank}.json").read_text())
        resumed = json.loads((tmp_path / f"resumed-2-{rank}.json").read_text())
        # Same weights, Adam moments, step count and schedule: the same next losses.
        assert resumed["losses"] == continued, (rank, resumed, continued)
        assert resumed["position"] == {"epoch": 0, "rows": 10 + rank}
    mp.spawn(trainworkers.resume, args=(1, free_port(), 1, folder), nprocs=1)
    alone = json.loads((tmp_path / "resumed-1-0.json").read_text())
    # One rank sees rank 0's batches; its first loss is rank 0's (same weights, now whole).
    continued_rank0 = json.loads((tmp_path / "continued-2-0.json").read_text())[0]
    assert alone["losses"][0] == pytest.approx(continued_rank0, rel=1e-5)
    # One worker's split is the whole epoch: it skips the rows both ranks had consumed.
    assert alone["position"] == {"epoch": 0, "rows": 21}
    report(f"2-rank ZeRO-1 checkpoint: 2-rank resume losses equal; 1-rank first loss "
           f"{alone['losses'][0]:.6f} vs {continued_rank0:.6f}")  # fmt: skip
