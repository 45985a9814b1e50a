"""The Ray Train stages decide their device from the connected Ray cluster: GPUs and
NCCL where it has one for every worker, CPUs and gloo otherwise, and `cuda` without
the GPUs is refused before any worker starts."""

import pytest

from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train.config import TrainConfig
from uniloom.pipelines.train.trainer import worker_resources

pytestmark = pytest.mark.integration


def test_workers_get_the_gpus_the_cluster_has_or_the_cpus(ray_local):
    gpus = ray_local.cluster_resources().get("GPU", 0)
    scaling, torch_config = worker_resources(TrainConfig(device="auto", cpus_per_worker=0.5), 2)
    assert scaling.use_gpu == (gpus >= 2) and torch_config.backend == ("nccl" if gpus >= 2 else "gloo")
    scaling, torch_config = worker_resources(TrainConfig(device="cpu"), 1)
    assert (scaling.use_gpu, torch_config.backend) == (False, "gloo")
    too_many = int(gpus) + 1
    with pytest.raises(
        UniloomError, match=f"train.device=cuda, but there is not a GPU for each of the {too_many}"
    ):
        worker_resources(TrainConfig(device="cuda"), too_many)
