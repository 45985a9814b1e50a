"""Where a stage computes: one decision per stage, then every tensor follows the model.

`device: auto | cpu | cuda` in the tokenizer, train and eval sections (the data stage's
encoder actors follow `data.exec.actor_gpus`). "auto" is CUDA where there is a GPU to
run on (the Ray cluster's for the Ray Train stages, this process's for inference) and
the CPU otherwise; "cuda" without a GPU is an error, never a quiet CPU run. After that
decision nothing assumes a device:

- tensors a step builds for a model (batches, masks, index vectors, generators) go to
  the device the model is on: `device_of(model)`, a DeepSpeed engine's own device;
- tensors handed to a collective live where the process group's backend works on them:
  the GPU for NCCL, the CPU for gloo and the shared-memory channels (`collective_device`).

The CPU and the GPU run the same code: the device is a value read from the model, not a
branch.
"""

from __future__ import annotations

import itertools

import torch

from uniloom.pipelines.errors import UniloomError

DEVICES = ("auto", "cpu", "cuda")


def resolve(setting: str, gpus: bool, key: str = "device", need: str = "a CUDA GPU") -> str:
    """The device ("cpu" or "cuda") that `setting` means where `gpus` says whether the
    GPUs it needs (`need`, for the error) are there; `key` names the config field."""
    if setting not in DEVICES:
        raise UniloomError(f"{key}={setting!r}: choose from {', '.join(DEVICES)}")
    if setting == "cuda" and not gpus:
        raise UniloomError(f"{key}=cuda, but there is not {need} to run on: set {key}=auto or cpu")
    if setting == "auto":
        return "cuda" if gpus else "cpu"
    return setting


def local_gpus() -> bool:
    """This process sees a CUDA GPU."""
    return torch.cuda.is_available()


def local_device() -> str:
    """ "auto" for this process: its GPU where it has one, else the CPU."""
    return resolve("auto", local_gpus())


def ray_gpus(workers: int) -> bool:
    """The connected Ray cluster has a GPU for each of `workers` processes (Ray must be
    initialised). Two NCCL ranks cannot share one GPU, so fewer GPUs than workers is no
    GPU run: "auto" then trains on the CPU, "cuda" is refused."""
    import ray

    return ray.cluster_resources().get("GPU", 0) >= workers


def backend(device: str) -> str:
    """The torch.distributed backend of workers on `device`: NCCL between GPUs, gloo else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def device_of(model) -> torch.device:
    """The device `model` computes on: a DeepSpeed engine's own, else the one device all
    of the module's parameters and buffers are on (the CPU for a module without any: it
    computes wherever its inputs are). A module spread over several devices is refused,
    since a tensor made for it would sit beside only part of it."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    if len(devices) > 1:
        where = ", ".join(sorted(map(str, devices)))
        raise UniloomError(f"{type(model).__name__} is on {where}: move all of it to one device first")
    return devices.pop() if devices else torch.device("cpu")


def backend_device(name: str) -> torch.device:
    """Where a collective of backend `name` wants its tensors: the current GPU for NCCL
    (alone or in a per-device pair such as "cpu:gloo,cuda:nccl"), the CPU otherwise."""
    if "nccl" in name:
        return torch.device("cuda")  # the process's current GPU, which its rank set
    return torch.device("cpu")


def collective_device(group=None) -> torch.device:
    """backend_device of `group`'s backend (the default group's when None); the CPU
    when no process group is up (a single worker reduces nothing)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return torch.device("cpu")
    return backend_device(str(dist.get_backend(group)))


def synchronize(device) -> None:
    """Wait for the work queued on `device` (a GPU runs asynchronously): before a clock
    is read."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def name(device) -> str:
    """The device's model name: the GPU's, or the CPU's."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from uniloom.pipelines.precision import _cpuinfo

    return _cpuinfo()[0]


def peak_memory_gib(device) -> float:
    """This process's peak memory on `device` so far: the GPU's allocated bytes, or on a
    CPU the process's resident set (the most it held, from the kernel)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def generator(device, seed: int) -> torch.Generator:
    """A seeded generator on `device`: sampling on a GPU needs one there."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)
