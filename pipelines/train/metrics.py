"""What a training run measures, and its MLflow side (rank 0 only, through
pipelines/tracking.py's RunLogger).

Every rank accumulates a window of steps (`Window`); at a log step the windows are summed
over ranks with one all-reduce, and rank 0 logs: loss (total, text, flow, aux, anchor), loss per
task kind, tokens/s (per worker and total), learning rate, the expert-load spread of every
layer, and MLflow's system metrics. At evaluations it adds the expert-load histogram per
layer (JSON + heat map) and sample images.

A run keeps ONE MLflow run across restarts: the driver creates it once and stores its id
beside the Ray Train run (`mlflow_run.json` in the run's storage folder); every restart
and every stage re-attaches to that id.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from uniloom.pipelines.tracking import RunLogger
from uniloom.pipelines.train.config import TASK_KINDS

RUN_FILE = "mlflow_run.json"
RATES = (
    "tokens_per_s",
    "tokens_per_s_per_worker",
    "tokens_per_cpu_s_per_worker",
)  # reported with checkpoints


# per task, its text and image terms (flow: MingTok's and TUNA's flow matching; code:
# UniTok's code cross-entropy, MingTok's coarse-code cross-entropy)
KINDS = [f"{task}/{kind}" for task in TASK_KINDS for kind in ("text", "flow", "code")]
HEAD = 10  # batches, loss, text, flow, aux, tokens, elapsed, cpu, anchor, code: Window.vectors


@dataclass
class Window:
    """Sums over the micro steps since the last log."""

    batches: int = 0
    loss: float = 0.0
    text: float = 0.0
    flow: float = 0.0
    aux: float = 0.0
    anchor: float = 0.0
    code: float = 0.0
    tokens: int = 0
    task_sum: dict[str, float] = field(default_factory=dict)
    task_n: dict[str, int] = field(default_factory=dict)
    expert_load: torch.Tensor | None = None  # (L, E)
    started: float = field(default_factory=time.perf_counter)
    started_cpu: float = field(default_factory=time.process_time)  # this worker process's CPU time

    def add(self, losses, tokens: int) -> None:
        self.batches += 1
        self.loss += losses.total.item()
        self.text += losses.text.item()
        self.flow += losses.flow.item()
        self.aux += losses.aux.item()
        self.anchor += losses.anchor.item()
        self.code += losses.code.item()
        self.tokens += tokens
        for k, v in losses.per_task.items():
            self.task_sum[k] = self.task_sum.get(k, 0.0) + v
            self.task_n[k] = self.task_n.get(k, 0) + 1
        load = losses.expert_load.detach().float()
        self.expert_load = load if self.expert_load is None else self.expert_load + load

    def vectors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's sums (float64: the HEAD, then per task kind the loss sums and
        counts) and expert loads (L, E), on `device`: where the process group's backend
        reduces them (pipelines/device.py collective_device; NCCL takes none from the CPU)."""
        elapsed = time.perf_counter() - self.started
        cpu = time.process_time() - self.started_cpu
        head = [self.batches, self.loss, self.text, self.flow, self.aux, self.tokens, elapsed, cpu, self.anchor,
                self.code]  # fmt: skip
        sums = [self.task_sum.get(k, 0.0) for k in KINDS] + [float(self.task_n.get(k, 0)) for k in KINDS]
        vec = torch.tensor(head + sums, dtype=torch.float64, device=device)
        load = (self.expert_load if self.expert_load is not None else torch.zeros(0)).to(device)
        return vec, load

    def reduce(self, world: int, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Means over all ranks' batches; tokens/s per worker and in total."""
        vec, load = self.vectors(device)
        if world > 1:
            dist.all_reduce(vec)
            dist.all_reduce(load)
        vec, load = vec.cpu(), load.cpu()  # read on the host from here on
        n = max(vec[0].item(), 1.0)
        tokens, elapsed, cpu = vec[5].item(), vec[6].item() / world, vec[7].item()
        out = {
            "loss": vec[1].item() / n,
            "loss_text": vec[2].item() / n,
            "loss_flow": vec[3].item() / n,
            "loss_aux": vec[4].item() / n,
            "loss_anchor": vec[8].item() / n,  # the semantic decoder's drift (train/module.py)
            "loss_code": vec[9].item() / n,
            "tokens_per_s": tokens / elapsed,
            "tokens_per_s_per_worker": tokens / elapsed / world,
            # Throughput per CPU-second a worker got: what the machinery costs in work, apart
            # from how much of a shared machine the scheduler gave it.
            "tokens_per_cpu_s_per_worker": tokens / max(cpu, 1e-9),
        }
        sums, counts = vec[HEAD : HEAD + len(KINDS)], vec[HEAD + len(KINDS) :]
        for k, s, c in zip(KINDS, sums.tolist(), counts.tolist()):
            if c:
                out[f"loss_{k.replace('/', '_')}"] = s / c
        for layer, row in enumerate(load.tolist() if load.numel() else []):
            row = np.asarray(row)
            out[f"expert_load_cv/layer{layer}"] = float(row.std() / max(row.mean(), 1e-9))
        out["_expert_load"] = load
        return out


def expert_histogram(logger: RunLogger, load: torch.Tensor, tag: str) -> None:
    """Per-layer expert loads as JSON and as a heat map (layers x experts)."""
    if not logger.active or load.numel() == 0:
        return
    from PIL import Image

    frac = load / load.sum(1, keepdim=True).clamp_min(1)
    logger.dict({"layers": frac.tolist()}, f"expert_load/{tag}.json")
    pixels = (255 * frac / frac.max().clamp_min(1e-9)).byte().numpy()
    image = Image.fromarray(pixels, mode="L").resize(
        (pixels.shape[1] * 16, pixels.shape[0] * 16), Image.NEAREST
    )
    logger.image(image, f"expert_load/{tag}.png")


def resolve_run(fs, run_dir: str, create) -> str:
    """The MLflow run id stored in the run's folder, or a new run (`create()`) recorded
    there, so every restart of a Ray Train run logs into the same MLflow run."""
    path = f"{run_dir}/{RUN_FILE}"
    if fs.exists(path):
        return json.loads(fs.cat_file(path))["run_id"]
    run_id = create()
    fs.makedirs(run_dir, exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps({"run_id": run_id}))
    return run_id
