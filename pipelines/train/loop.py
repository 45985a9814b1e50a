"""The training loop that runs in every Ray Train worker, one stage after another.

Per stage, in this order (the fixed order of parallelize.py-style wrapping):
  build the model (same seed on every rank) -> load weights (the previous stage's
  checkpoint, or the trained tokenizer's weights for a fresh run) -> expert parallelism ->
  freeze what the stage freezes -> DeepSpeed MoE switch -> AdamW over MoE-split groups
  -> deepspeed.initialize -> (resuming mid-stage) optimizer, schedule, data position.

Per optimizer step: grad_accum micro steps of (batch, all-reduced end-of-epoch flag,
engine forward, engine.backward, engine.step; `backward_and_step`), then the weight EMA
(ema.py) of what this rank holds. Every `checkpoint_every` steps and at the end of a stage
every rank writes its part of the checkpoint (the EMA with it) and reports it to Ray
Train. A stage that trains MingTok's semantic decoder anchors it to the tokenizer
stage's (module.py).

Workers on one machine exchange through shared memory (shm_comm, train.shm_collectives):
the experts' all-to-alls, the end-of-epoch flag and, at ZeRO 0, the gradient all-reduce,
which `SharedMemoryReduction` then does in place of the engine's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from uniloom.models.moe import MoE
from uniloom.pipelines import device, precision, progress
from uniloom.pipelines.config import UniloomConfig, build
from uniloom.pipelines.tokenizer.kinds import kind_of
from uniloom.pipelines.tracking import RunLogger
from uniloom.pipelines.train import checkpoint as ckpt
from uniloom.pipelines.train import deepspeed_config, ema, expert_parallel, flops, flow_balance, shm_comm
from uniloom.pipelines.train.config import StageConfig
from uniloom.pipelines.train.data import Position, Stream, TaskSampler
from uniloom.pipelines.train.metrics import RATES, Window, expert_histogram
from uniloom.pipelines.train.module import Trainee, compile_dense
from uniloom.pipelines.train.recipe import Resume, global_step

_STARTED = time.time()


def _say(rank: int, text: str) -> None:
    if rank == 0:
        # not print(): Ray Train's print patch would echo it twice
        sys.stderr.write(f"[train +{time.time() - _STARTED:.0f}s] {text}\n")
        sys.stderr.flush()


def tokenizer_state(uri: str, storage_options: dict) -> dict[str, torch.Tensor]:
    """The tokenizer stage's weights (of tokenizer.kind's model)."""
    from safetensors.torch import load as load_safetensors

    from uniloom.pipelines.data.image_tokenizer import read_weights

    return load_safetensors(read_weights(uri, storage_options))


def load_tokenizer(trainee: Trainee, uri: str, storage_options: dict) -> None:
    trainee.tokenizer.load_state_dict(tokenizer_state(uri, storage_options))


def anchor_tokenizer(trainee: Trainee, stage: StageConfig, uri: str, storage_options: dict) -> None:
    """Where the stage trains the semantic decoder, anchor it to the tokenizer stage's,
    read from `uri` (resuming mid-stage, the trainee holds the trained one)."""
    if "semantic_decoder" in stage.trainable and stage.anchor_weight:
        trainee.anchor(tokenizer_state(uri, storage_options), stage.anchor_weight)


def build_engine(cfg: UniloomConfig, name: str, world: int, ep: int, reader: ckpt.Reader | None, job: dict):
    import deepspeed

    t, stage = cfg.train, cfg.train.stages[name]
    torch.manual_seed(t.seed)
    trainee = Trainee(cfg.model, kind_of(cfg).config(cfg))
    if reader is None:
        load_tokenizer(trainee, job["tokenizer_weights"], cfg.data.storage_options)
        if job.get("coarse_centers"):
            trainee.model.set_coarse_centers(torch.tensor(job["coarse_centers"]))
    on_cpu = worker_device(t) == "cpu"  # shared memory carries CPU tensors only
    expert_parallel.parallelize(trainee, ep, t.shadow_min_slots, shm=t.shm_collectives and on_cpu)
    head = trainee.kind.token_flow_head(trainee.model)  # a kind without one has no rows to balance
    if world > 1 and head is not None:
        from deepspeed.utils import groups

        flow_balance.balance(head, t.flow_balance_min_rows,
                             groups._get_data_parallel_group(), data_parallel_channel(t, world))  # fmt: skip
    if reader is not None:
        ckpt.load_weights(trainee, reader)
    trainee.set_trainable(stage.trainable)
    anchor_tokenizer(trainee, stage, job["tokenizer_weights"], cfg.data.storage_options)
    trainee.input_noise = t.input_noise
    if t.compile:
        compile_dense(trainee)
    expert_parallel.mark_for_deepspeed(trainee, ep)
    opt = deepspeed_config.optimizer(trainee, t, stage)
    engine, *_ = deepspeed.initialize(
        model=trainee,
        optimizer=opt,
        lr_scheduler=deepspeed_config.scheduler(opt, stage),
        config=deepspeed_config.engine_config(t, world, precision.resolve(t.precision, worker_device(t))),
    )
    engine.uniloom_reduction = SharedMemoryReduction.attach(engine, data_parallel_channel(t, world))
    return engine, trainee


def _agreed_done(done_B: torch.Tensor) -> bool:
    """Every rank's rows are done (ranks decoding in lock step stop together)."""
    flag = done_B.all().to(device=device.collective_device(), dtype=torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def worker_device(t) -> str:
    """This worker's device: train.device resolved against the GPUs Ray gave it."""
    return device.resolve(t.device, device.local_gpus(), "train.device")


def data_parallel_channel(t, world: int):
    """The shared-memory channel of the data-parallel group (the flow head's replicas, the
    dense gradients, the end-of-epoch flag), or None: off, on GPUs, or across machines.
    Collective on first use; shm_comm keeps it."""
    if world < 2 or not t.shm_collectives or worker_device(t) != "cpu":
        return None
    from deepspeed.utils import groups

    return shm_comm.channel(groups._get_data_parallel_group())


def backward_and_step(engine, loss: torch.Tensor) -> None:
    """engine.backward, then (at a gradient-accumulation boundary) the shared-memory
    gradient reduction where build_engine put it in place of the engine's own, engine.step."""
    engine.backward(loss)
    if engine.uniloom_reduction is not None and engine.is_gradient_accumulation_boundary():
        engine.uniloom_reduction()
    engine.step()


class SharedMemoryReduction:
    """The engine's ZeRO-0 gradient all-reduce (DeepSpeedEngine.buffered_allreduce_fallback:
    non-expert gradients summed over the data-parallel group, each expert group's over its
    expert-data-parallel group, all divided by the data-parallel size) through shm_comm
    channels, for workers that share a machine: 1.3 ms against gloo's 5.9 for the tiny
    preset's 1.8M gradients. ZeRO 1/2 reduce inside their optimizer and keep DeepSpeed's."""

    def __init__(self, engine, dense, experts: dict, scale: float):
        self.engine, self.dense, self.experts, self.scale = engine, dense, experts, scale

    @classmethod
    def attach(cls, engine, dense) -> SharedMemoryReduction | None:
        """Switch the engine's own reduction off and return this one, where it applies
        (ZeRO 0, `dense` the data-parallel group's channel)."""
        from deepspeed.utils import groups

        if engine.zero_optimization_stage() != 0 or dense is None:
            return None
        experts = {}
        for name in groups._get_expert_data_parallel_group_dict():
            group = groups._get_expert_data_parallel_group(name)
            experts[name] = (group, shm_comm.channel(group) if dist.get_world_size(group) > 1 else None)
        engine.enable_backward_allreduce = False
        return cls(engine, dense, experts, 1.0 / dist.get_world_size(groups._get_data_parallel_group()))

    def __call__(self) -> None:
        """After engine.backward, at a gradient-accumulation boundary."""
        non_expert, expert = self.engine._get_gradients_for_reduction()  # DeepSpeed's split
        scale = self.scale  # 1 / data-parallel size, as DeepSpeed averages
        self.dense.all_reduce_(non_expert, scale)
        for name, grads in expert.items():
            group, channel = self.experts[name]
            if not grads:
                continue
            if channel is not None:
                channel.all_reduce_(grads, scale)
            elif dist.get_world_size(group) > 1:
                flat = torch._utils._flatten_dense_tensors(grads)
                dist.all_reduce(flat, group=group)
                for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat.mul_(scale), grads)):
                    g.copy_(r)
            else:  # every expert on every rank of its group: nothing to sum
                torch._foreach_mul_(grads, scale)


class StageRun:
    """One stage on one worker: its engine, its stream, its step."""

    def __init__(self, cfg: UniloomConfig, job: dict, name: str, resume: Resume, stream: Stream | None, ctx):
        self.cfg, self.job, self.name, self.ctx = cfg, job, name, ctx
        self.t, self.stage = cfg.train, cfg.train.stages[name]
        self.rank, self.world = ctx["rank"], ctx["world"]
        self.ep = ctx["ep"]
        reader = resume.reader
        self.engine, self.trainee = build_engine(cfg, name, self.world, self.ep, reader, job)
        # Batches go where the engine computes; the end-of-epoch flag and the metrics
        # where the process group's backend reduces them (NCCL: the GPU, gloo: the CPU).
        self.device = device.device_of(self.engine)
        self.collective = device.collective_device()
        self.trained: dict[str, int] = {}  # flops.batch_counts summed: what this worker trained on
        self.ema = ema.start(self.trainee, self.t.ema_decay, reader)
        self.channel = data_parallel_channel(self.t, self.world)  # the engine's: shm_comm keeps it
        experts = next((m.experts for m in self.trainee.modules() if isinstance(m, MoE)), None)
        shm = [what for what, on in (("expert all-to-alls", getattr(experts, "channel", None) is not None),
                                     ("gradient all-reduce", self.engine.uniloom_reduction is not None)) if on]  # fmt: skip
        _say(self.rank, f"stage {name}: DeepSpeed engine ready ({type(self.engine.optimizer).__name__}); "
                        f"through shared memory: {', '.join(shm) or 'nothing'}")  # fmt: skip
        self.step = 0
        self.losses = list(resume.losses)
        self.resumes = list(resume.resumes)
        self.last_rates: dict[str, float] = {}
        position = Position()
        if reader is not None:
            position = Position(**reader.position(self.rank, self.world))
            if resume.mid_stage:
                ckpt.load_optimizer(self.engine, self.trainee, reader)
                self.step = resume.step
        sampler = TaskSampler(self.stage, self.t, job["image_tokenizer"])
        if stream is None:
            stream = Stream(ctx["shard"], sampler, self.t, self.rank, position)
        else:
            stream.set_sampler(sampler)
        self.stream = stream

    @property
    def global_step(self) -> int:
        return global_step(self.t, self.name, self.step)

    def micro_step(self, micro: int, window: Window, last: list):
        """One forward, backward and engine step; the losses, or None when this worker's
        epoch ran dry and it only took part in the collectives."""
        batch = self.stream.next_batch()
        # any rank's exhausted split: the sum > 0
        flag = torch.tensor([1.0 if self.stream.exhausted else 0.0], device=self.collective)
        if self.channel is not None:
            self.channel.all_reduce_([flag])
        elif self.world > 1:
            dist.all_reduce(flag)
        weight = 1.0
        if batch is None:  # this worker's epoch ran dry: take part in the collectives only
            batch, weight = last[0], 0.0
        batch = last[0] = batch.to(self.device)
        # Flow-matching noise and times from a generator fixed by (seed, rank, step):
        # a resumed run draws exactly what the uninterrupted one would have.
        torch.manual_seed(hash((self.t.seed, self.rank, self.global_step, micro)) % (1 << 62))
        losses = self.engine(batch)
        backward_and_step(self.engine, losses.total * weight)
        if weight:
            counts = flops.batch_counts(batch)
            window.add(losses, counts["tokens"])
            flops.add_counts(self.trained, counts)
        if flag.item():
            self.stream.new_epoch()
        return losses if weight else None

    def run(self, logger: RunLogger) -> None:
        t = self.t
        _say(
            self.rank,
            f"stage {self.name}: steps {self.step}..{self.stage.steps}, trainable {self.stage.trainable}",
        )
        window, last = Window(), [None]
        while self.step < self.stage.steps:
            self.train_step(window, last, logger)
            done, logged = self.step == self.stage.steps, self.log_due
            if (t.eval_every and self.step % t.eval_every == 0) or done:
                self.evaluate(logger)
            if self.step % t.checkpoint_every == 0 or done:
                self.checkpoint(done)
            if logged:  # evaluation and checkpoints are not training time
                window = Window()

    def train_step(self, window: Window, last: list, logger: RunLogger) -> list:
        """One optimizer step as a run takes it: grad_accum micro steps, the weight EMA,
        and at a log step the window's metrics reduced over the workers and logged (the
        caller starts the next window). Returns the micro steps' losses (None: dry)."""
        losses = [self.micro_step(micro, window, last) for micro in range(self.t.grad_accum)]
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        if self.log_due:
            self.log(window, logger)
        return losses

    @property
    def log_due(self) -> bool:
        """The step just taken is logged: every log_every steps and the stage's last."""
        return self.step % self.t.log_every == 0 or self.step == self.stage.steps

    def log(self, window: Window, logger: RunLogger) -> None:
        values = window.reduce(self.world, self.collective)
        values["lr"] = self.engine.get_lr()[0]
        values["stage_index"] = list(self.t.stages).index(self.name)
        # rows skipped (a sample over seq_len, no task of the mix), never silently: counted here
        values["samples_too_long"] = float(self.stream.sampler.too_long)
        values["samples_no_task"] = float(self.stream.sampler.no_task)
        self.last_load = values["_expert_load"]
        self.last_rates = {k: values[k] for k in RATES}
        self.losses.append([self.global_step, self.name, round(values["loss"], 5)])
        logger.metrics(values, self.global_step)
        if self.rank == 0:  # the whole recipe's steps: one bar for the train stage
            total = sum(s.steps for s in self.t.stages.values())
            progress.report("train", self.global_step, total, "steps", {
                "loss": f"{values['loss']:.4f}", "tokens/s": f"{values['tokens_per_s']:.0f}",
                "lr": f"{values['lr']:.2e}", "stage": f"{self.name} {self.step}/{self.stage.steps}"})  # fmt: skip

    def evaluate(self, logger: RunLogger) -> None:
        """Sample images from the eval prompts with the EMA weights where there are (every
        rank: experts are sharded, so the forward passes run in lock step), logged by rank
        0 with the expert loads."""
        from uniloom.models.generation import generate
        from uniloom.pipelines.tokenizer.data import to_uint8

        tag = f"{self.name}_step{self.global_step:07d}"
        if self.job["eval_prompt_ids"]:
            module = self.engine.module
            module.eval()
            g = device.generator(self.device, self.t.seed)
            with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
                out = generate(module.model, module.tokenizer, self.job["eval_prompt_ids"], generator=g)
            module.train()
            logger.image(np.concatenate(list(to_uint8(out.images)), axis=1), f"samples/{tag}.png")
        if getattr(self, "last_load", None) is not None:
            expert_histogram(logger, self.last_load, tag)
        if self.t.curve_scenes:
            self.curve(logger, tag)

    def curve(self, logger: RunLogger, tag: str) -> None:
        """The learning curve's point: GenEval, VQA and edit success of the EMA weights on
        validation-split scenes (never the test split), every rank in lock step; and the
        example grids of each GenEval category and edit round, so the samples of each
        recipe stage show where it fails."""
        from uniloom.pipelines.evaluate.benchmark import held_out
        from uniloom.pipelines.evaluate.report import example_grids
        from uniloom.pipelines.evaluate.univision import Bundle, evaluate_items
        from uniloom.pipelines.train.trainer import text_tokenizer

        cfg, module = self.cfg, self.engine.module
        items = held_out(cfg.corpus.seed, self.t.curve_scenes, cfg.corpus.max_objects, split="val")
        text = text_tokenizer(self.job["shards_uri"], cfg.data.storage_options)
        bundle = Bundle(module.model, module.tokenizer, text, {}, all_done=_agreed_done)
        start = time.time()
        module.eval()
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
            evaluation = evaluate_items(bundle, cfg.eval, items)
        module.train()
        metrics = evaluation.metrics
        curve = {f"curve/{k}": v for k, v in metrics.items() if not k.endswith(("_n", "_lo", "_hi"))}
        logger.metrics(curve, self.global_step)
        for name, grid in example_grids(evaluation).items():
            logger.image(grid, f"samples/{tag}/{name}.png")
        shown = ("geneval_overall", "vqa_accuracy", "edit_success_1", "edit_success_3")
        _say(self.rank, f"{self.name} step {self.step} validation ({len(items)} scenes, {time.time() - start:.0f}s): "
                        + " ".join(f"{k} {metrics[k]:.3f}" for k in shown if k in metrics))  # fmt: skip

    def checkpoint(self, done: bool) -> None:
        import ray.train

        meta = None
        if self.rank == 0:
            meta = {
                "world": self.world,
                "ep": self.ep,
                "stage": self.name,
                "step": self.step,
                "done": done,
                "global_step": self.global_step,
                "recipe": list(self.t.stages),
                "losses": self.losses,
                "resumes": self.resumes,
                "ema_updates": self.ema.updates if self.ema is not None else 0,
                "started_from": self.job.get("start_from"),  # another run's stage end, or None
                **{k: self.job[k] for k in ("image_tokenizer", "text_tokenizer", "mlflow_run_id")},
            }
        with tempfile.TemporaryDirectory(prefix="uniloom-ckpt-") as tmp:
            ckpt.save(self.engine, self.trainee, tmp, self.rank, self.ep, asdict(self.stream.position), meta,
                      self.ema.shadow if self.ema is not None else None)  # fmt: skip
            # the last stage's end is the run's result, which no later run starts after
            keep = done and self.job.get("stage_ends") and self.name != list(self.t.stages)[-1]
            if keep:
                fs, folder, marker = self.stage_end()
                fs.makedirs(folder, exist_ok=True)
                for f in sorted(os.listdir(tmp)):  # this rank's files (rank 0: meta.json too)
                    fs.put_file(os.path.join(tmp, f), f"{folder}/{f}")
            last = self.losses[-1][2] if self.losses else float("nan")
            ray.train.report(
                {"global_step": self.global_step, "stage": self.name, "loss": last, **self.last_rates},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"ckpt-{self.global_step:08d}-{self.name}",
            )
        if self.world > 1:
            dist.barrier()  # every rank's files are in storage before anyone reads them
        if keep and self.rank == 0:  # the copy is complete: a later run may start from it
            record = {
                "stage": self.name,
                "prefix": self.job["prefixes"][self.name],
                "global_step": self.global_step,
            }
            fs.pipe_file(marker, json.dumps(record).encode())

    def stage_end(self):
        """(filesystem, folder, marker) of the copy of this stage's final checkpoint that a
        later run of the same recipe prefix may start from (trainer.find_start); Ray Train
        keeps only the last `keep_checkpoints`. Rank 0 removes an earlier attempt's marker."""
        from uniloom.pipelines.data.fs import open_fs
        from uniloom.pipelines.train.trainer import STAGE_END_DONE

        fs, folder = open_fs(f"{self.job['stage_ends']}/{self.name}", self.cfg.data.storage_options)
        marker = f"{folder}/{STAGE_END_DONE}"
        if self.rank == 0 and fs.exists(marker):
            fs.rm(marker)
        return fs, folder, marker


def core_slice(cores: list[int], local_rank: int, local_world: int) -> list[int]:
    """This worker's share of the cores it may run on: equal, disjoint, in order; all of
    them when there are fewer cores than workers on the node."""
    per = len(cores) // local_world
    return cores[local_rank * per : (local_rank + 1) * per] if per else cores


def bind_cores(local_rank: int, local_world: int) -> list[int]:
    """Pin every thread of this process (torch's, gloo's, Ray's) to its core slice."""
    mine = core_slice(sorted(os.sched_getaffinity(0)), local_rank, local_world)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), mine)
        except OSError:  # a thread that ended meanwhile
            continue
    return mine


def worker_setup(job: dict[str, Any]) -> tuple[UniloomConfig, dict[str, Any]]:
    """The config and this worker's context: rank, world, expert-parallel size, shard."""
    import ray.train

    # Everything a worker prints (DeepSpeed writes to stdout) goes to stderr, which Ray
    # forwards to the driver's stderr: the driver's stdout stays for the --json summary.
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    cfg = build(UniloomConfig, job["cfg"])
    torch.set_num_threads(cfg.train.threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if worker_device(cfg.train) == "cuda":
        # This worker's GPU is the current one before any collective: NCCL binds each
        # communicator to the device current at its first use (the expert and flow-balance
        # groups are used before DeepSpeed sets it).
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    elif cfg.train.bind_cores and hasattr(os, "sched_setaffinity"):
        cores = bind_cores(context.get_local_rank(), context.get_local_world_size())
        _say(rank, f"workers bound to cores (rank 0: {cores})")
    ep = expert_parallel.effective_ep(cfg.train.expert_parallel, world, cfg.model.num_experts)
    return cfg, {"rank": rank, "world": world, "ep": ep, "shard": ray.train.get_dataset_shard("train")}


def train_loop_per_worker(job: dict[str, Any]) -> None:
    """Ray Train entry point; `job` is built by pipelines/train/trainer.py."""
    import ray.train

    from uniloom.pipelines.train.recipe import plan_resume

    cfg, ctx = worker_setup(job)
    t, rank, world = cfg.train, ctx["rank"], ctx["world"]
    logger = RunLogger(job["mlflow_uri"], job["mlflow_run_id"], active=rank == 0)
    if logger.active:  # the precision chosen on this worker's machine ("auto" is measured there)
        import mlflow

        mlflow.set_tags(precision.tags("train", t.precision, worker_device(t)))
    checkpoint = ray.train.get_checkpoint()
    # a new run (no checkpoint of its own yet) may start from another run's stage end
    start = job.get("start_from") if checkpoint is None else None
    stream = None
    try:
        if checkpoint:
            source = checkpoint.as_directory()
        else:
            source = (
                stage_end_directory(start["checkpoint"], cfg.data.storage_options) if start else _nothing()
            )
        with source as directory:
            reader = ckpt.Reader(directory) if directory else None
            resume = plan_resume(t, job["stages"], reader.meta if reader else None, job)
            resume.reader = reader
            if checkpoint:  # a restart, or a rerun of the run: recorded in every later checkpoint
                resume.resumes.append({"global_step": reader.meta["global_step"], "workers": world})
            stages = resume.todo
            if checkpoint:
                _say(rank, f"resuming {checkpoint.path} with {world} worker(s): {resume.describe()}")
            elif start:
                _say(rank, f"starting from run {start['run']}'s end of stage {start['stage']} "
                           f"({start['checkpoint']}): {resume.describe()}")  # fmt: skip
            run = StageRun(cfg, job, stages[0], resume, stream, ctx) if stages else None
        for i, name in enumerate(stages):
            start = time.perf_counter()
            run.run(logger)
            _say(rank, f"stage {name} done in {time.perf_counter() - start:.1f} s")
            if i + 1 < len(stages):
                stream = run.stream
                del run
                # The next stage starts from the checkpoint just reported (all ranks' parts).
                with ray.train.get_checkpoint().as_directory() as directory:
                    resume = Resume.from_stage_end(ckpt.Reader(directory))
                    run = StageRun(cfg, job, stages[i + 1], resume, stream, ctx)
    finally:
        logger.close()


@contextlib.contextmanager
def stage_end_directory(uri: str, storage_options: dict):
    """A local folder holding the checkpoint at `uri` (copied from an object store)."""
    from uniloom.pipelines.data.fs import is_local, open_fs

    fs, path = open_fs(uri, storage_options)
    if is_local(fs):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="uniloom-start-") as tmp:
        for remote in fs.ls(path, detail=False):
            fs.get_file(remote, os.path.join(tmp, os.path.basename(remote)))
        yield tmp


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
