"""Shared-memory collectives (pipelines/train/shm_comm.py) in real processes against gloo:
the same all-to-all bits and all-reduce sums, a fallback every rank agrees on, a dead
peer detected rather than waited for, and the ZeRO-0 gradient reduction equal to
DeepSpeed's own; many collectives under random pauses, collectives called in different
orders raising instead of hanging, and the flow head's exchanges in the backward of a
rank without image targets."""

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch.multiprocessing as mp
import trainworkers
from localcluster import free_port

pytestmark = pytest.mark.integration


def spawn_within(fn, world: int, timeout_s: float, *args) -> None:
    """mp.spawn of `world` workers that fails instead of hanging: after timeout_s the
    workers are killed and the test fails."""
    ctx = mp.start_processes(
        fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} still running after {timeout_s:.0f} s: the ranks hang")


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


def test_many_small_collectives_under_random_pauses_on_two_channels():
    spawn_within(trainworkers.shm_stress, 2, 300)


def test_collectives_called_in_different_orders_raise_instead_of_hanging():
    spawn_within(trainworkers.shm_misuse, 2, 300)


def test_a_rank_without_image_targets_takes_part_in_the_flow_exchanges_backward():
    spawn_within(trainworkers.flow_without_targets, 2, 300)


def test_pin_ninja_puts_the_ninja_packages_binary_first_once(monkeypatch, tmp_path):
    import ninja

    from uniloom.pipelines.train.ds_ops import pin_ninja

    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin")
    assert pin_ninja() == ninja.BIN_DIR and pin_ninja() == ninja.BIN_DIR
    assert os.environ["PATH"] == os.pathsep.join([ninja.BIN_DIR, str(tmp_path), "/usr/bin"])
    assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")


def test_deepspeeds_shm_op_loads_through_the_pinned_ninja_whichever_path_finds_first(tmp_path):
    """A process whose PATH finds another ninja first (a system one of another version
    rebuilds the op each time: pipelines/train/ds_ops.py) still loads the op through the
    ninja package's, as training's create_groups does: the other ninja never runs."""
    decoy, ran = tmp_path / "bin" / "ninja", tmp_path / "decoy-ran"
    decoy.parent.mkdir()
    decoy.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    decoy.chmod(0o755)
    script = (
        "import torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)\n"
        "from uniloom.pipelines.train.expert_parallel import create_groups\n"
        "create_groups(1)\n"
        "from deepspeed.comm import comm\n"
        "assert comm.cdb.shm_comm_op is not None, 'no shm op'\n"
    )
    env = {**os.environ, "PATH": f"{decoy.parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not ran.exists()
