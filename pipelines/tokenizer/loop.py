"""The per-worker training loop of the tokenizer under Ray Train (tokenizer.kind: MingTok's
masked image modeling, UniTok, TUNA's VAE; step.py TRAININGS): a cosine schedule over the
step budget (a wall-clock cap only as a safety net), evaluation and MLflow logging on
rank 0, and checkpoints that a rerun of the same run resumes from."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniloom.pipelines import device, precision, progress
from uniloom.pipelines.config import UniloomConfig, build
from uniloom.pipelines.tokenizer.evaluate import grid_image, psnr, reconstruct_all, ssim
from uniloom.pipelines.tokenizer.kinds import kind_of
from uniloom.pipelines.tokenizer.step import TRAININGS, TokenizerTraining
from uniloom.pipelines.tracking import RunLogger


def evaluate_during_training(model, images: np.ndarray) -> tuple[dict[str, float], Any]:
    recons = reconstruct_all(model, images)
    originals = images.transpose(0, 2, 3, 1)
    model.train()
    metrics = {
        "eval/psnr": float(psnr(originals, recons).mean()),
        "eval/ssim": float(ssim(originals, recons).mean()),
    }
    return metrics, grid_image(originals, recons)


def _batches(shard, batch_size: int, seed: int):
    """Endless (images uint8, caption index) batches from this worker's dataset shard."""
    epoch = 0
    while True:
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=seed + epoch,
        ):
            yield batch["image"], batch["caption"]
        epoch += 1


class Clock:
    """Seconds of training so far, carried over from the checkpoint: wall-clock time, or
    ("cpu") this process's CPU time divided by its threads, the time an unshared machine
    would have needed, so that a budget means the same on a busy shared machine."""

    def __init__(self, kind: str, threads: int, state: dict):
        self.kind, self.threads = kind, threads
        self.wall0 = time.perf_counter() - state.get("wall", state["elapsed"])
        self.cpu0 = time.process_time() - state.get("cpu", 0.0)

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def cpu(self) -> float:
        return time.process_time() - self.cpu0

    def __call__(self) -> float:
        return self.cpu() / self.threads if self.kind == "cpu" else self.wall()

    def state(self, step: int, start_step: int) -> dict:
        return {
            "step": step,
            "elapsed": self(),
            "wall": self.wall(),
            "cpu": self.cpu(),
            "start_step": start_step,
        }


class Budget:
    """The run's budget is its steps, so a slow machine gets the same model later rather
    than a worse one; `max_minutes` (by the budget clock) is a safety cap, and a run it
    ends before its steps says so."""

    def __init__(self, steps: int, max_minutes: float):
        self.steps, self.cap_s = steps, max_minutes * 60

    def cut(self, step: int, elapsed: float) -> bool:
        """The cap ends the run before its steps."""
        return step < self.steps and self.cap_s > 0 and elapsed >= self.cap_s

    def warning(self, step: int) -> str:
        return (
            f"WARNING: the {self.cap_s / 60:g}-minute safety cap (tokenizer.max_minutes) ended "
            f"tokenizer training after {step} of {self.steps} planned steps: this model is "
            "undertrained; raise the cap or lower tokenizer.steps"
        )


def _agree(elapsed: float, done: bool, world: int) -> tuple[float, bool]:
    """The slowest worker's clock and whether any worker is done: every worker then stops on
    the same step (each process's clock differs a little)."""
    if world == 1:
        return elapsed, done
    value = torch.tensor(
        [elapsed, 1.0 if done else 0.0], dtype=torch.float64, device=device.collective_device()
    )
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return float(value[0]), bool(value[1])


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg: UniloomConfig = build(UniloomConfig, config["cfg"])
    t = cfg.tokenizer
    torch.set_num_threads(t.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    where = device.resolve(t.device, device.local_gpus(), "tokenizer.device")  # the GPUs Ray gave it
    if where == "cuda":
        torch.cuda.set_device(ray.train.torch.get_device())
    training = TRAININGS[t.kind](kind_of(cfg).config(cfg), t, config["text"], where)
    state = {"step": 0, "elapsed": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = training.load(Path(folder))
    start_step = state["step"]
    training.generator.manual_seed(t.seed * 1000 + rank + start_step)  # each worker masks differently
    if world > 1:
        training.wrapped = ray.train.torch.prepare_model(training.module)
    tracker = RunLogger(config["mlflow_uri"], config["mlflow_run_id"], active=rank == 0)
    tracker.tags(precision.tags("tokenizer", t.precision, training.device))
    eval_images = np.asarray(config["eval_images"], dtype=np.uint8)
    budget = Budget(t.steps, t.max_minutes)
    shard = ray.train.get_dataset_shard("train")
    batches = _batches(shard, t.batch_size // world, t.seed + start_step + rank)
    clock = Clock(t.budget_clock, t.threads, state)
    step, started = start_step, time.perf_counter()
    while True:
        elapsed, done = _agree(clock(), step >= t.steps, world)
        if done or budget.cut(step, elapsed):
            break
        images_u8, caption = next(batches)
        values = training.step(images_u8, caption, step)
        step += 1
        last = step >= t.steps  # the safety cap ends at the check above, then the tail below runs
        if rank == 0 and (step % t.log_interval == 0 or last):
            images_per_s = (step - start_step) * t.batch_size / (time.perf_counter() - started)
            _log(tracker, values, step, t.steps, clock(), images_per_s)
        if rank == 0 and (step % t.eval_interval == 0 or last):
            _evaluate(tracker, training.model, eval_images, step)
        if step % t.checkpoint_interval == 0 or last:
            state = clock.state(step, start_step)
            _report(state, values["loss/total"], rank, training)
    if budget.cut(step, elapsed) and rank == 0:  # the driver's summary and metrics say it too
        print(f"[tokenizer] {budget.warning(step)}", file=sys.stderr, flush=True)
    if state["step"] != step:  # stopped by the safety cap between checkpoints
        if rank == 0:
            _evaluate(tracker, training.model, eval_images, step)
        state = clock.state(step, start_step)
        _report(state, values["loss/total"], rank, training)
    elif step == start_step:  # nothing left to do (the run had finished): say where it stands
        ray.train.report({**state, "start_step": start_step})
    tracker.close()


def _log(
    tracker: RunLogger, values: dict, step: int, steps: int, elapsed: float, images_per_s: float
) -> None:
    tracker.metrics({**values, "elapsed_s": elapsed, "images_per_s": images_per_s}, step)
    progress.report("tokenizer", step, steps, "steps",
                    {"loss": f"{values['loss/total']:.4f}", "images/s": f"{images_per_s:.1f}"})  # fmt: skip


def _evaluate(tracker: RunLogger, model, eval_images: np.ndarray, step: int) -> None:
    if not len(eval_images):
        return
    metrics, grid = evaluate_during_training(model, eval_images)
    tracker.metrics(metrics, step)
    tracker.image(grid, f"reconstructions/step_{step:07d}.png")
    print(f"[tokenizer] step {step} held-out PSNR {metrics['eval/psnr']:.2f} dB", file=sys.stderr, flush=True)


def _report(state: dict, loss: float, rank: int, training: TokenizerTraining) -> None:
    import ray.train

    metrics = {**state, "loss": loss}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        training.save(Path(folder), state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
