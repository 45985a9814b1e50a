"""Shared-memory collectives (pipelines/train/shm_comm.py) in real processes against gloo:
the same all-to-all bits and all-reduce sums, a fallback every rank agrees on, a dead
peer detected rather than waited for, and the ZeRO-0 gradient reduction equal to
DeepSpeed's own."""

import pytest
import torch.multiprocessing as mp
import trainworkers
from localcluster import free_port

pytestmark = pytest.mark.integration


def test_shm_all_to_all_and_all_reduce_match_gloo_on_three_ranks():
    mp.spawn(trainworkers.shm_collectives, args=(3, free_port()), nprocs=3)


def test_a_rank_without_shared_memory_turns_the_channel_off_everywhere():
    mp.spawn(trainworkers.shm_fallback, args=(2, free_port()), nprocs=2)


def test_a_dead_peer_raises_instead_of_hanging():
    mp.spawn(trainworkers.shm_dead_peer, args=(3, free_port()), nprocs=3)


def test_shm_gradient_reduction_equals_deepspeeds(tmp_path):
    from uniloom.pipelines.data.image_tokenizer import save_random_weights

    save_random_weights(trainworkers.MINGTOK, str(tmp_path / "mingtok.safetensors"))
    mp.spawn(trainworkers.reduction, args=(2, free_port(), str(tmp_path)), nprocs=2)


def test_the_flow_head_balanced_across_ranks_gives_the_unbalanced_losses_and_gradients():
    mp.spawn(trainworkers.flow_balance, args=(4, free_port()), nprocs=4)
