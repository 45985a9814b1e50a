"""`uniloom bench train`: the full training path against a plain PyTorch loop, in one run.

full path   Ray Data over the shards -> streaming split -> Ray Train workers (gloo) ->
            DeepSpeed engine (MoE parameter groups, expert parallelism over the workers,
            the preset's ZeRO stage): tokens/s per worker
plain loop  the same model (all experts local), the same batches (the same sampler and
            packer over the same shards, rows read with pyarrow, batches built in the
            loop), the same threads, torch AdamW + clipping + schedule: no Ray Data, no
            DeepSpeed, no collectives: tokens/s
ratio       full / plain

How they are measured side by side: inside the same Ray Train run, every worker
alternates timed windows of the two (plain, full, plain, full, ...), so both see the same
machine: the same number of busy processes (each worker runs its own plain loop in the
plain windows) and the same load from anything else. On a shared machine this is what
keeps the ratio about the machinery rather than about when each side happened to run.
Warm-up windows of both are discarded. Tokens per CPU-second (each worker's own process
time) are reported beside: the machinery's cost in work, whatever the scheduler did.

On CUDA the bench also reports MFU of the plain loop: model FLOPs per token (6 x active
parameters + attention) x tokens/s over the GPU's bf16 dense peak.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from uniloom.pipelines.config import CorpusConfig, UniloomConfig
from uniloom.pipelines.train.config import PARTS, StageConfig


def bench_stage(cfg: UniloomConfig, steps: int) -> StageConfig:
    """Every part trains (the experts too: expert parallelism is on the path), at the
    second stage's mix and rate, constant after one warm-up step."""
    joint = list(cfg.train.stages.values())[min(1, len(cfg.train.stages) - 1)]
    return StageConfig(list(PARTS), dict(joint.mix), joint.lr, steps, warmup_steps=1, min_lr_ratio=1.0,
                       anchor_weight=joint.anchor_weight)  # fmt: skip


def make_shards(cfg: UniloomConfig, work: Path, images: int, echo: Callable[[str], None]) -> None:
    """Corpus -> random MingTok -> the real data stage, into cfg.train.shards."""
    from uniloom.pipelines.corpus.synth import synthesize
    from uniloom.pipelines.data.image_tokenizer import save_random_weights
    from uniloom.pipelines.data.runner import run

    synthesize(CorpusConfig(num=images, shards=2, size=cfg.mingtok.image_size, seed=5), work / "corpus")
    cfg.data.tokenizer_weights = save_random_weights(cfg.mingtok, str(work / "mingtok.safetensors"))
    cfg.data.bpe_vocab_size = min(cfg.data.bpe_vocab_size, cfg.model.vocab_size)
    echo(f"data: {images} rendered scenes through the data stage")
    run(cfg, [str(work / "corpus")], cfg.train.shards)


def plain_batches(cfg: UniloomConfig, stage: StageConfig, seed_offset: int = 0) -> Iterator:
    """Endless batches from the sampler and packer a worker uses, over rows read into
    memory with pyarrow (no Ray): built when the loop asks for them."""
    import pyarrow.parquet as pq

    from uniloom.pipelines.train.data import COLUMNS, Packer, TaskSampler, find_shards

    shards = find_shards(cfg.train.shards, cfg.data.storage_options)
    sampler = TaskSampler(stage, cfg.train, shards.image_tokenizer)
    rows = []
    for path in shards.files:
        with shards.fs.open(path, "rb") as f:
            rows += pq.read_table(f, columns=COLUMNS).to_pylist()
    packer, epoch = Packer(cfg.train.micro_batch, cfg.train.seq_len), seed_offset
    while True:
        for row in rows:
            sample = sampler(row, epoch)
            batch = packer.add(sample) if sample is not None else None
            if batch is not None:
                yield batch
        epoch += 1


class PlainLoop:
    """A single-process PyTorch training loop: forward, backward, clip, AdamW, schedule."""

    def __init__(self, cfg: UniloomConfig, stage: StageConfig, seed_offset: int = 0):
        import torch

        from uniloom.pipelines.train import deepspeed_config
        from uniloom.pipelines.train.loop import anchor_tokenizer, load_tokenizer
        from uniloom.pipelines.train.module import Trainee

        self.t = cfg.train
        torch.manual_seed(self.t.seed)
        # the full path's initial weights: the same seed, the same MingTok
        self.model = Trainee(cfg.model, cfg.mingtok)
        load_tokenizer(self.model, cfg.data.tokenizer_weights, cfg.data.storage_options)
        self.model.set_trainable(stage.trainable)
        anchor_tokenizer(self.model, stage, cfg.data.tokenizer_weights, cfg.data.storage_options)
        groups = deepspeed_config.param_groups(self.model, self.t.weight_decay)
        self.opt = deepspeed_config.adamw(groups, self.t, stage)
        self.sched = deepspeed_config.scheduler(self.opt, stage)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = plain_batches(cfg, stage, seed_offset)

    def steps(self, n: int) -> dict[str, float]:
        """Run n optimizer steps; tokens, wall and CPU seconds."""
        import torch

        tokens, start, cpu = 0, time.perf_counter(), time.process_time()
        for _ in range(n):
            for _ in range(self.t.grad_accum):
                batch = next(self.batches)
                (self.model(batch).total / self.t.grad_accum).backward()
                tokens += int((batch.doc_ids >= 0).sum())
            torch.nn.utils.clip_grad_norm_(self.params, self.t.grad_clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
        return {"tokens": tokens, "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _reduce(values: list[float], world: int, op: str = "SUM") -> list[float]:
    """Sums (or MIN, MAX) over workers."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def expert_rank_load(loads_SLE, ep: int) -> float:
    """Token-slots routed to the busiest expert-parallel rank over the mean rank's, per
    layer and step, averaged: 1.0 is even. loads_SLE (steps, layers, experts) are summed
    over the ranks of one expert-parallel group; rank r holds experts [r*E/ep, (r+1)*E/ep).
    This is the routing's imbalance: without shadow experts the routed-expert part of every
    layer takes this many times its even share on the lock-stepped path; shadow experts
    (train.shadow_min_slots) move the excess compute to the lighter ranks."""
    S, L, E = loads_SLE.shape
    per_rank = loads_SLE.double().reshape(S, L, ep, E // ep).sum(-1)
    return float((per_rank.amax(-1) / per_rank.mean(-1).clamp(min=1e-9)).mean())


def _group_loads(loads: list, ep: int, world: int) -> float:
    """expert_rank_load of the full windows' micro steps, each worker's expert-parallel
    group summed, then averaged over the groups."""
    import torch
    import torch.distributed as dist
    from deepspeed.utils import groups

    from uniloom.pipelines.train.expert_parallel import group_name

    if not loads:  # no timed rounds: every worker has none
        return 1.0
    stacked = torch.stack(loads)
    if ep > 1:
        dist.all_reduce(stacked, group=groups._get_expert_parallel_group(group_name(ep)))
    (mean,) = _reduce([expert_rank_load(stacked, ep)], world)
    return mean / world


def bench_loop_per_worker(job: dict[str, Any]) -> None:
    """Ray Train entry point of the bench: alternating plain and full windows."""
    import ray.train

    from uniloom.pipelines.train.loop import StageRun, worker_setup
    from uniloom.pipelines.train.metrics import Window
    from uniloom.pipelines.train.recipe import Resume

    cfg, ctx = worker_setup(job)
    world, steps, rounds = ctx["world"], job["window_steps"], job["rounds"]
    name = next(iter(cfg.train.stages))
    full = StageRun(cfg, job, name, Resume(todo=[name]), None, ctx)
    plain = PlainLoop(cfg, cfg.train.stages[name], seed_offset=ctx["rank"])
    totals = {"plain": [0.0, 0.0, 0.0], "full": [0.0, 0.0, 0.0]}  # tokens, seconds, cpu (summed)
    loads = []  # (L, E) token-slots per expert of every timed full micro step, this worker's
    for r in range(rounds + 1):  # round 0 warms both up
        # Every window starts on all workers at once: a worker that ends its plain window
        # early must not time its wait for the others as the full path's.
        _barrier(world)
        p = plain.steps(steps)
        _barrier(world)
        window, last = Window(), [None]
        for _ in range(steps):
            for micro in range(cfg.train.grad_accum):
                losses = full.micro_step(micro, window, last)
                if r and losses is not None:
                    loads.append(losses.expert_load.detach().float())
            full.step += 1
        f = {"tokens": window.tokens, "seconds": time.perf_counter() - window.started,
             "cpu": time.process_time() - window.started_cpu}  # fmt: skip
        if r:
            for side, m in (("plain", p), ("full", f)):
                totals[side] = [a + b for a, b in zip(totals[side], (m["tokens"], m["seconds"], m["cpu"]))]
    plain_sum, full_sum = _reduce(totals["plain"], world), _reduce(totals["full"], world)
    (slowest,) = _reduce([totals["plain"][0] / totals["plain"][1]], world, "MIN")
    figures = {
        # per worker: (tokens summed over workers / workers) / (seconds summed / workers)
        "plain_tokens_per_s": plain_sum[0] / plain_sum[1],
        "full_tokens_per_s_per_worker": full_sum[0] / full_sum[1],
        "plain_tokens_per_cpu_s": plain_sum[0] / plain_sum[2],
        "full_tokens_per_cpu_s_per_worker": full_sum[0] / full_sum[2],
        "timed_seconds_per_side": full_sum[1] / world,
        "plain_tokens_per_s_slowest_worker": slowest,
        "expert_rank_load": _group_loads(loads, ctx["ep"], world),
    }
    with tempfile.TemporaryDirectory() as tmp:  # the driver gets results with a checkpoint
        (Path(tmp) / "bench.json").write_text(json.dumps(figures))
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if ctx["rank"] == 0 else None
        ray.train.report(figures, checkpoint=checkpoint)


def run_bench(cfg: UniloomConfig, workers: int, steps: int, rounds: int, echo: Callable[[str], None]):
    import ray.data
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from uniloom.pipelines.raycluster import init_ray
    from uniloom.pipelines.train import recipe
    from uniloom.pipelines.train.data import read_dataset
    from uniloom.pipelines.train.trainer import effective_config, expert_parallel_size, prepare_job

    t = cfg.train
    cfg, image_fp = effective_config(cfg)
    job = prepare_job(cfg, recipe.select(t, None), image_fp)
    job.update(window_steps=steps, rounds=rounds, eval_prompt_ids=[], mlflow_uri="", mlflow_run_id="")
    init_ray(cfg.ray)
    echo(f"full path and plain loop, {rounds} timed windows of {steps} steps each (after one warm-up "
         f"window), {workers} worker(s) x {t.threads} thread(s), expert-parallel size "
         f"{expert_parallel_size(cfg, workers)}, ZeRO {t.zero_stage}")  # fmt: skip
    options = ray.data.ExecutionOptions()
    options.preserve_order = True
    trainer = TorchTrainer(
        bench_loop_per_worker,
        train_loop_config=job | {"shards": None},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": t.cpus_per_worker}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=f"bench-{int(time.time())}", storage_path=t.storage),
        datasets={"train": read_dataset(job["shards"], t)},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=options),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / "bench.json").read_text())


def mfu(cfg: UniloomConfig, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation on CUDA (bf16 dense peak of the device), else None."""
    import torch

    if not torch.cuda.is_available():
        return None
    from uniloom.models.univision import UniVision

    with torch.device("meta"):
        counts = UniVision(cfg.model).parameter_counts()
    m = cfg.model
    attention = 12 * m.num_layers * m.num_heads * m.head_dim * cfg.train.seq_len
    name = torch.cuda.get_device_name()
    peak = 989e12 if "H100" in name or "H200" in name else 312e12  # bf16 dense: Hopper, else A100
    return (6 * counts["backbone_active"] + attention) * tokens_per_s / peak


def bench_train(cfg: UniloomConfig, workers: int, steps: int, rounds: int, images: int, work: Path | None,
                echo: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="uniloom-bench-train-") as tmp:
        root = Path(work or tmp)
        cfg.workspace = str(root / "ws")
        t = cfg.train
        t.shards, t.storage = str(root / "shards"), str(root / "ray_results")
        t.stages = {"bench": bench_stage(cfg, (rounds + 1) * steps)}
        make_shards(cfg, root, images, echo)
        m = run_bench(cfg, workers, steps, rounds, echo)
    out = {
        "full_tokens_per_s_per_worker": round(m["full_tokens_per_s_per_worker"], 1),
        "plain_tokens_per_s": round(m["plain_tokens_per_s"], 1),
        "ratio": round(m["full_tokens_per_s_per_worker"] / m["plain_tokens_per_s"], 3),
        "full_tokens_per_cpu_s_per_worker": round(m["full_tokens_per_cpu_s_per_worker"], 1),
        "plain_tokens_per_cpu_s": round(m["plain_tokens_per_cpu_s"], 1),
        "ratio_cpu": round(m["full_tokens_per_cpu_s_per_worker"] / m["plain_tokens_per_cpu_s"], 3),
        # what a lock-stepped path reaches at no cost: it runs at the slowest worker's pace
        "lockstep_ceiling": round(m["plain_tokens_per_s_slowest_worker"] / m["plain_tokens_per_s"], 3),
        # busiest expert-parallel rank's routed token-slots over the mean rank's (1.0: even)
        "expert_rank_load": round(m["expert_rank_load"], 3),
        "workers": workers,
        "expert_parallel": min(t.expert_parallel, workers),
        "zero_stage": t.zero_stage,
        "threads_per_process": t.threads,
        "micro_batch": t.micro_batch,
        "seq_len": t.seq_len,
        "timed_steps_per_side": rounds * steps,
        "timed_seconds_per_side": round(m["timed_seconds_per_side"], 1),
        "cpu_count": os.cpu_count(),
        "load_1min_before": load_before,
        "load_1min_after": round(os.getloadavg()[0], 2),
    }
    value = mfu(cfg, m["plain_tokens_per_s"])
    if value is not None:
        out["plain_mfu"] = round(value, 4)
    return out
