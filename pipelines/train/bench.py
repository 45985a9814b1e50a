"""`uniloom bench train`: the full training path against a plain PyTorch loop, in one run.

full path   Ray Data over the shards -> streaming split -> Ray Train workers (NCCL on
            GPUs, gloo on CPUs) -> DeepSpeed engine (MoE parameter groups, expert
            parallelism over the workers, the preset's ZeRO stage), stepped by the loop a
            run takes (StageRun.train_step: micro steps, weight EMA, the metrics reduced
            over the workers and logged every log_every steps): tokens/s per worker
plain loop  the same model (all experts local) on the same device in the same precision,
            the same batches (the same sampler and packer over the same shards, rows read
            with pyarrow, batches built in the loop), the same threads, torch AdamW +
            clipping + schedule: no Ray Data, no DeepSpeed, no collectives: tokens/s
ratio       full / plain
compiled    (--compile) the plain loop with train.compile on, in windows alternating with
            the two others: compile_speedup = compiled / plain

How they are measured side by side: inside the same Ray Train run, every worker
alternates timed windows of the two (plain, full, plain, full, ...), so both see the same
machine: the same number of busy processes (each worker runs its own plain loop in the
plain windows) and the same load from anything else. On a shared machine this is what
keeps the ratio about the machinery rather than about when each side happened to run.
Warm-up windows of both are discarded. Tokens per CPU-second (each worker's own process
time) are reported beside: the machinery's cost in work, whatever the scheduler did.

Both sides report model FLOPs per token (train/flops.py: the backbone's dense and
active-expert matmuls and attention as torchtitan and Megatron count them, plus the vision
heads per image slot and target, over the timed batches' own mix), the FLOP/s they reach,
MFU against the GPU's dense bf16 peak (none on a CPU: there MFU is not applicable), and
the peak memory (the GPU's allocated bytes on CUDA, the worker's resident set on a CPU).
--profile adds, after the timed windows, one window of rank 0's plain loop under
torch.profiler: where the time goes (profile_window).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from uniloom.pipelines.config import CorpusConfig, UniloomConfig
from uniloom.pipelines.train import flops
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
    """A single-process PyTorch training loop: forward, backward, clip, AdamW, schedule, on
    `where` in the precision the full path resolves there."""

    def __init__(self, cfg: UniloomConfig, stage: StageConfig, where: str, seed_offset: int = 0,
                 compile: bool | None = None):  # fmt: skip
        import torch

        from uniloom.pipelines import precision
        from uniloom.pipelines.tokenizer.kinds import kind_of
        from uniloom.pipelines.train import deepspeed_config
        from uniloom.pipelines.train.loop import anchor_tokenizer, load_tokenizer
        from uniloom.pipelines.train.module import Trainee, compile_dense

        self.t = cfg.train
        torch.manual_seed(self.t.seed)
        # the full path's initial weights: the same seed, the same MingTok
        self.model = Trainee(cfg.model, kind_of(cfg).config(cfg))
        load_tokenizer(self.model, cfg.data.tokenizer_weights, cfg.data.storage_options)
        self.model.set_trainable(stage.trainable)
        anchor_tokenizer(self.model, stage, cfg.data.tokenizer_weights, cfg.data.storage_options)
        self.model.input_noise = self.t.input_noise
        if self.t.compile if compile is None else compile:
            compile_dense(self.model)
        self.device = torch.device(where)
        self.model.to(self.device)
        self.precision = precision.resolve(self.t.precision, self.device)
        groups = deepspeed_config.param_groups(self.model, self.t.weight_decay)
        self.opt = deepspeed_config.adamw(groups, self.t, stage)
        self.sched = deepspeed_config.scheduler(self.opt, stage)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = plain_batches(cfg, stage, seed_offset)

    def steps(self, n: int) -> dict[str, Any]:
        """Run n optimizer steps; what they trained on (flops.batch_counts), wall and CPU seconds."""
        import torch

        from uniloom.pipelines import device, precision

        counts: dict[str, int] = {}
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            for _ in range(self.t.grad_accum):
                batch = next(self.batches).to(self.device)
                with precision.autocast(self.precision, self.device):
                    loss = self.model(batch).total / self.t.grad_accum
                loss.backward()
                flops.add_counts(counts, flops.batch_counts(batch))
            torch.nn.utils.clip_grad_norm_(self.params, self.t.grad_clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
        device.synchronize(self.device)
        return {"counts": counts, "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}


# What a profiled window's time is spent on, by op (CPU) or kernel (CUDA) name.
MATMUL = re.compile(r"aten::(mm|addmm|bmm|baddbmm|_grouped_mm|matmul)$|gemm|nvjet|xmma|cutlass|wgmma", re.I)
ATTENTION = re.compile(r"flash|fmha|attention|sdpa", re.I)


def profile_window(loop: PlainLoop, steps: int, top: int = 12) -> dict[str, Any]:
    """One more window of the plain loop under torch.profiler: where its time goes. On
    CUDA the kernels' own time, with the share of the window's wall time the GPU was busy
    (well under 1: the GPU waits on launches and the host) and the kernels launched per
    step; on a CPU the ops' own time. The matmul and attention shares say how much of the
    time is the work MFU counts; the rest (norms, routing, permutes, elementwise, copies)
    is what fusion or compilation would take away."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from uniloom.pipelines import device

    cuda = loop.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    device.synchronize(loop.device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        loop.steps(steps)  # synchronizes at its end
        wall = time.perf_counter() - start
    if cuda:
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        own = {e.key: e.self_device_time_total for e in events}
        launches = sum(e.count for e in events)
    else:  # only ops without CPU children of their own count their self time: all of it
        own = {e.key: e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")}
        launches = None
    total = sum(own.values()) or 1.0

    def share(pattern: re.Pattern) -> float:
        return round(sum(t for k, t in own.items() if pattern.search(k)) / total, 4)

    ranked = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    out = {
        "profile_steps": steps,
        "profile_wall_ms": round(wall * 1e3, 1),
        "profile_busy_ms": round(total / 1e3, 1),
        "profile_matmul_share": share(MATMUL),
        "profile_attention_share": share(ATTENTION),
        "profile_top": [[k[:80], round(t / 1e3, 2), round(t / total, 4)] for k, t in ranked],
    }
    if cuda:
        out["profile_gpu_busy_share"] = round(total / 1e6 / wall, 4)
        out["profile_kernels_per_step"] = round(launches / steps)
    return out


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _reduce(values: list[float], world: int, op: str = "SUM") -> list[float]:
    """Sums (or MIN, MAX) over workers."""
    import torch
    import torch.distributed as dist

    from uniloom.pipelines.device import collective_device

    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
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


def _resident_bytes(loop: PlainLoop) -> int:
    """Bytes the plain loop keeps on its device between its windows (weights, buffers,
    Adam moments): the full path's peak is read with them subtracted."""
    tensors = [*loop.model.parameters(), *loop.model.buffers()]
    tensors += [v for state in loop.opt.state.values() for v in state.values() if hasattr(v, "element_size")]
    return sum(t.numel() * t.element_size() for t in tensors if t.device == loop.device)


def bench_loop_per_worker(job: dict[str, Any]) -> None:
    """Ray Train entry point of the bench: alternating plain and full windows."""
    import ray.train

    from uniloom.pipelines import device
    from uniloom.pipelines.tracking import RunLogger
    from uniloom.pipelines.train.loop import StageRun, worker_setup
    from uniloom.pipelines.train.metrics import Window
    from uniloom.pipelines.train.recipe import Resume

    cfg, ctx = worker_setup(job)
    world, steps, rounds = ctx["world"], job["window_steps"], job["rounds"]
    name = next(iter(cfg.train.stages))
    stage = cfg.train.stages[name]
    full = StageRun(cfg, job, name, Resume(todo=[name]), None, ctx)
    plain = PlainLoop(cfg, stage, str(full.device), seed_offset=ctx["rank"])
    # --compile: a third side, the plain loop with train.compile on (its first window compiles)
    compiled = (
        PlainLoop(cfg, stage, str(full.device), ctx["rank"], compile=True) if job.get("compile") else None
    )
    logger = RunLogger("", "", active=False)  # the run's logging path, without an MLflow run to write to
    sides = ("plain", "full", "compiled") if compiled else ("plain", "full")
    totals = {side: {"counts": {}, "seconds": 0.0, "cpu": 0.0} for side in sides}
    loads = []  # (L, E) token-slots per expert of every timed full micro step, this worker's
    peak = 0.0
    last = [None]
    for r in range(rounds + 1):  # round 0 warms both up
        # Every window starts on all workers at once: a worker that ends its plain window
        # early must not time its wait for the others as the full path's.
        _barrier(world)
        p = plain.steps(steps)
        _barrier(world)
        if full.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(full.device)
        before, start, cpu = dict(full.trained), time.perf_counter(), time.process_time()
        window = Window()
        for _ in range(steps):
            losses = full.train_step(window, last, logger)
            if r:
                loads += [x.expert_load.detach().float() for x in losses if x is not None]
            if full.log_due:
                window = Window()
        device.synchronize(full.device)
        f = {"counts": {k: v - before.get(k, 0) for k, v in full.trained.items()},
             "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}  # fmt: skip
        if r and full.device.type == "cuda":  # the other sides' resident tensors subtracted
            resident = sum(_resident_bytes(loop) for loop in (plain, compiled) if loop is not None)
            peak = max(peak, device.peak_memory_gib(full.device) - resident / 2**30)
        elif r:  # the worker process's resident set: every side's weights and state
            peak = device.peak_memory_gib(full.device)
        windows = {"plain": p, "full": f}
        if compiled is not None:
            _barrier(world)
            windows["compiled"] = compiled.steps(steps)
        if r:
            for side, m in windows.items():
                flops.add_counts(totals[side]["counts"], m["counts"])
                totals[side]["seconds"] += m["seconds"]
                totals[side]["cpu"] += m["cpu"]
    count = flops.TrainingFlops.of(cfg, "semantic_decoder" in stage.trainable)
    sums = {}
    for side, tot in totals.items():
        values = [tot["counts"].get("tokens", 0), count.total(tot["counts"]), tot["seconds"], tot["cpu"]]
        sums[side] = dict(zip(("tokens", "flops", "seconds", "cpu"), _reduce(values, world)))
    plain_sum, full_sum = sums["plain"], sums["full"]
    (slowest,) = _reduce([totals["plain"]["counts"]["tokens"] / totals["plain"]["seconds"]], world, "MIN")
    (peak,) = _reduce([peak], world, "MAX")
    figures = {
        # per worker: (tokens summed over workers / workers) / (seconds summed / workers)
        "plain_tokens_per_s": plain_sum["tokens"] / plain_sum["seconds"],
        "full_tokens_per_s_per_worker": full_sum["tokens"] / full_sum["seconds"],
        "plain_tokens_per_cpu_s": plain_sum["tokens"] / plain_sum["cpu"],
        "full_tokens_per_cpu_s_per_worker": full_sum["tokens"] / full_sum["cpu"],
        "timed_seconds_per_side": full_sum["seconds"] / world,
        "plain_tokens_per_s_slowest_worker": slowest,
        "expert_rank_load": _group_loads(loads, ctx["ep"], world),
        # model FLOPs of the timed batches (their own mix of text and images) per token
        "plain_model_flops_per_tok": plain_sum["flops"] / plain_sum["tokens"],
        "full_model_flops_per_tok": full_sum["flops"] / full_sum["tokens"],
        "plain_flops_per_s": plain_sum["flops"] / plain_sum["seconds"],
        "full_flops_per_s_per_worker": full_sum["flops"] / full_sum["seconds"],
        "device": device.name(full.device),
        "device_type": full.device.type,
        "peak_memory_gib": peak,
    }
    if compiled is not None:
        c = sums["compiled"]
        figures.update(
            compiled_tokens_per_s=c["tokens"] / c["seconds"], compiled_flops_per_s=c["flops"] / c["seconds"]
        )
    if job.get("profile") and ctx["rank"] == 0:  # after the timed windows: it slows what it watches
        figures.update(profile_window(plain, steps))
    with tempfile.TemporaryDirectory() as tmp:  # the driver gets results with a checkpoint
        (Path(tmp) / "bench.json").write_text(json.dumps(figures))
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if ctx["rank"] == 0 else None
        ray.train.report(figures, checkpoint=checkpoint)


def run_bench(cfg: UniloomConfig, workers: int, steps: int, rounds: int, echo: Callable[[str], None],
              profile: bool = False, compile: bool = False):  # fmt: skip
    import ray.data
    from ray.train import DataConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from uniloom.pipelines.raycluster import init_ray
    from uniloom.pipelines.train import recipe
    from uniloom.pipelines.train.data import read_dataset
    from uniloom.pipelines.train.trainer import (
        effective_config,
        expert_parallel_size,
        prepare_job,
        worker_resources,
    )

    t = cfg.train
    cfg, image_fp = effective_config(cfg)
    job = prepare_job(cfg, recipe.select(t, None), image_fp)
    job.update(
        window_steps=steps,
        rounds=rounds,
        profile=profile,
        compile=compile,
        eval_prompt_ids=[],
        mlflow_uri="",
        mlflow_run_id="",
    )
    init_ray(cfg.ray)
    scaling, torch_config = worker_resources(t, workers)
    echo(f"full path and plain loop, {rounds} timed windows of {steps} steps each (after one warm-up "
         f"window), {workers} worker(s) x {t.threads} thread(s) on {'GPUs' if scaling.use_gpu else 'CPUs'}, "
         f"expert-parallel size {expert_parallel_size(cfg, workers)}, ZeRO {t.zero_stage}")  # fmt: skip
    options = ray.data.ExecutionOptions()
    options.preserve_order = True
    trainer = TorchTrainer(
        bench_loop_per_worker,
        train_loop_config=job | {"shards": None},
        scaling_config=scaling,
        torch_config=torch_config,
        run_config=RunConfig(name=f"bench-{int(time.time())}", storage_path=t.storage),
        datasets={"train": read_dataset(job["shards"], t)},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=options),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / "bench.json").read_text())


def utilisation(figures: dict[str, Any]) -> dict[str, Any]:
    """MFU of each side against the device's dense bf16 peak (train/flops.py PEAK_BF16);
    on a CPU not applicable, on a GPU missing from the table unknown: said, not guessed."""
    if figures["device_type"] != "cuda":
        return {"mfu": "not applicable on a CPU (no published dense bf16 peak); see the TFLOP/s"}
    peak = flops.peak_bf16(figures["device"])
    if peak is None:
        return {"mfu": f"unknown: no bf16 peak for {figures['device']} in train/flops.py PEAK_BF16"}
    out = {
        "full_mfu": round(figures["full_flops_per_s_per_worker"] / peak, 4),
        "plain_mfu": round(figures["plain_flops_per_s"] / peak, 4),
        "peak_bf16_tflops": round(peak / 1e12, 1),
    }
    if "compiled_flops_per_s" in figures:
        out["compiled_mfu"] = round(figures["compiled_flops_per_s"] / peak, 4)
    return out


def bench_train(cfg: UniloomConfig, workers: int, steps: int, rounds: int, images: int, work: Path | None,
                echo: Callable[[str], None], profile: bool = False, compile: bool = False) -> dict[str, Any]:  # fmt: skip
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="uniloom-bench-train-") as tmp:
        root = Path(work or tmp)
        cfg.workspace = str(root / "ws")
        t = cfg.train
        t.shards, t.storage = str(root / "shards"), str(root / "ray_results")
        t.stages = {"bench": bench_stage(cfg, (rounds + 1) * steps)}
        make_shards(cfg, root, images, echo)
        m = run_bench(cfg, workers, steps, rounds, echo, profile, compile)
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
    count = flops.TrainingFlops.of(cfg)
    out.update({
        "device": m["device"],
        "full_model_flops_per_tok": round(m["full_model_flops_per_tok"]),
        "plain_model_flops_per_tok": round(m["plain_model_flops_per_tok"]),
        # the parts the per-token figures are made of (train/flops.py)
        "flops_per_tok_backbone": round(count.per_token),
        "flops_per_text_target": round(count.per_text_target),
        "flops_per_image_slot": round(count.per_image_slot),
        "flops_per_image_target": round(count.per_image_target),
        "full_tflops_per_s_per_worker": round(m["full_flops_per_s_per_worker"] / 1e12, 4),
        "plain_tflops_per_s": round(m["plain_flops_per_s"] / 1e12, 4),
        **utilisation(m),
        # CUDA: the full path's peak allocated bytes (the plain loop's resident tensors
        # subtracted); a CPU: the worker process's peak resident set (every side)
        "peak_memory_gib": round(m["peak_memory_gib"], 3),
        "peak_memory_of": "cuda allocated, full path" if m["device_type"] == "cuda" else "worker RSS, every side",
    })  # fmt: skip
    if compile:  # the plain loop compiled (train.compile) over the plain loop, side by side
        out["compiled_tokens_per_s"] = round(m["compiled_tokens_per_s"], 1)
        out["compile_speedup"] = round(m["compiled_tokens_per_s"] / m["plain_tokens_per_s"], 3)
    out.update({k: v for k, v in m.items() if k.startswith("profile_")})  # --profile: rank 0's plain loop
    return out
