"""One device story (pipelines/device.py): the device a stage runs on is decided once from
the config and the machine, then read from the model and the process group, never assumed.
These run on the CPU; where a tensor must be made on CUDA, torch's fake tensors stand in
for the GPU (FakeTensorMode makes `cuda` tensors without one and checks device agreement as
CUDA kernels would). tests/gpu runs the same code on a real GPU."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from uniloom.pipelines import device
from uniloom.pipelines.errors import UniloomError


def test_auto_is_the_gpu_where_there_is_one_and_cuda_without_one_is_refused():
    assert device.resolve("auto", gpus=False) == "cpu"
    assert device.resolve("auto", gpus=True) == "cuda"
    assert device.resolve("cpu", gpus=True) == "cpu"
    with pytest.raises(UniloomError, match=r"train.device=cuda, but there is not a GPU for each of the 2"):
        device.resolve("cuda", gpus=False, key="train.device", need="a GPU for each of the 2 workers")
    with pytest.raises(UniloomError, match="choose from auto, cpu, cuda"):
        device.resolve("gpu", gpus=True)


def test_the_device_is_read_from_the_model_and_follows_it():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    assert device.device_of(net) == torch.device("cpu")
    net.to("meta")
    assert device.device_of(net) == torch.device("meta")
    net[0].to_empty(device="cpu")  # half moved back: a tensor made for it would fit half of it
    with pytest.raises(UniloomError, match="Sequential is on cpu, meta: move all of it to one device"):
        device.device_of(net)
    assert device.device_of(torch.nn.ReLU()) == torch.device("cpu")  # nothing of its own: inputs decide


def test_collectives_take_their_tensors_where_the_backend_works(tmp_path):
    import torch.distributed as dist

    assert device.backend("cuda") == "nccl" and device.backend("cpu") == "gloo"
    assert device.backend_device("nccl").type == "cuda"
    assert device.backend_device("cpu:gloo,cuda:nccl").type == "cuda"  # a per-device pair
    assert device.backend_device("gloo").type == "cpu"
    assert device.collective_device() == torch.device("cpu")  # no process group: nothing reduced
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert device.collective_device() == torch.device("cpu")
        vec, load = _window().vectors(device.collective_device())
        dist.all_reduce(vec)  # what Window.reduce hands gloo
        assert vec.device.type == load.device.type == "cpu"
    finally:
        dist.destroy_process_group()


def _window(where: str = "cpu"):
    from uniloom.pipelines.train.metrics import Window

    window = Window(batches=2, loss=3.0, tokens=10)
    window.expert_load = torch.ones(2, 4, device=where)  # (L, E) token-slots, where the losses were
    return window


def test_the_metrics_go_to_the_collective_device_and_are_read_on_the_host():
    from uniloom.pipelines.train.metrics import HEAD

    with FakeTensorMode(allow_non_fake_inputs=True):
        vec, load = _window("cuda:0").vectors("cuda:0")  # an NCCL group's device (rank 0's GPU)
        assert vec.device.type == load.device.type == "cuda"
        assert vec.dtype == torch.float64 and vec.shape[0] > HEAD and load.shape == (2, 4)
    out = _window().reduce(world=1)
    assert out["loss"] == 1.5 and out["_expert_load"].device.type == "cpu"  # the histogram reads it


def test_the_expert_parallel_reorder_is_built_on_the_tokens_device():
    from uniloom.pipelines.train.expert_parallel import _expert_major_order

    # rank 0 sent 1 row for local expert 0 and 2 for expert 1, rank 1 sent 3 and 0:
    # expert-major order is expert 0's rows of rank 0 then rank 1, then expert 1's.
    assert _expert_major_order([[1, 2], [3, 0]], "cpu").tolist() == [0, 3, 4, 5, 1, 2]
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.randn(6, 4, device="cuda")  # the local experts' output rows, on the GPU
        order = _expert_major_order([[1, 2], [3, 0]], y.device)
        assert order.device.type == "cuda"
        back = torch.empty_like(y).index_copy(0, order, y)  # what forward does with it
        assert back.device.type == "cuda"
