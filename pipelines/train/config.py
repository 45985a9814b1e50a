"""The `train:` config section and its recipe stages. Its own module (no torch, no Ray):
loading a config stays cheap; pipelines/config.py holds it as `UniloomConfig.train`.

The recipe is an ordered mapping name -> StageConfig, filled by the preset, so one field
of one stage is a plain override: `--set train.stages.joint.steps=500`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TASK_KINDS = ("understanding", "text_to_image", "text", "editing")
# The recipe's trainable parts, named after MingTok's modules; each tokenizer kind says
# which of its modules each part is (pipelines/tokenizer/kinds.py `parts`): UniTok's code
# embedding and depth head, TUNA's cascade and velocity head. semantic_decoder is MingTok's
# alone: with UniTok or TUNA a stage that names it trains nothing more (the tokenizer
# stays frozen), so one recipe serves every kind.
PARTS = ("projector", "flow_head", "llm", "semantic_decoder")


@dataclass
class StageConfig:
    """One stage of the recipe: what trains, on which task mix, how long, how fast."""

    trainable: list[str] = field(default_factory=lambda: list(PARTS))  # of PARTS; the rest is frozen
    mix: dict[str, float] = field(default_factory=lambda: {"understanding": 0.3, "text_to_image": 0.7})
    lr: float = 1e-3
    steps: int = 100  # optimizer steps
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    # Where the semantic decoder trains: weight of the MSE between its features and the
    # tokenizer stage's on the same latents, which keeps the frozen pixel decoder able to
    # render them (pipelines/train/module.py); 0: unanchored
    anchor_weight: float = 1.0

    def __post_init__(self) -> None:
        if unknown := sorted(set(self.trainable) - set(PARTS)):
            raise ValueError(f"trainable: unknown part(s) {unknown} (choose from {list(PARTS)})")
        if not self.trainable:
            raise ValueError("trainable: a stage must train at least one part")
        if unknown := sorted(set(self.mix) - set(TASK_KINDS)):
            raise ValueError(f"mix: unknown task kind(s) {unknown} (choose from {list(TASK_KINDS)})")
        if any(w < 0 for w in self.mix.values()) or not sum(self.mix.values()) > 0:
            raise ValueError("mix: weights must be >= 0 with a positive sum")
        if self.steps < 1 or self.lr <= 0:
            raise ValueError("steps must be >= 1 and lr > 0")
        if self.anchor_weight < 0:
            raise ValueError("anchor_weight must be >= 0")


def _paper_recipe() -> dict[str, StageConfig]:
    """Ming-UniVision's four stages (../shared/design/MODEL_SPEC.md), but the align stage
    trains the LLM too: the paper's starts from a pretrained Ling-lite, ours from random
    weights (`check_llm_trains_first`)."""
    heads = ["projector", "flow_head"]
    return {
        "align": StageConfig([*heads, "llm"], {"understanding": 0.3, "text_to_image": 0.7}),
        "joint": StageConfig(
            [*heads, "llm", "semantic_decoder"], {"understanding": 0.25, "text_to_image": 0.7, "text": 0.05}
        ),
        "sft": StageConfig([*heads, "llm"], {"understanding": 0.3, "text": 0.1, "text_to_image": 0.6}),
        "edit": StageConfig(
            [*heads, "llm"], {"understanding": 0.15, "text_to_image": 0.25, "text": 0.05, "editing": 0.55}
        ),
    }


def check_llm_trains_first(stages: dict[str, StageConfig]) -> None:
    """No pretrained LLM is ever loaded (the LLM starts from random weights), so a stage
    that freezes it before any stage has trained it would fit the heads to noise: the
    first stage must train it."""
    name, first = next(iter(stages.items()))
    if "llm" not in first.trainable:
        raise ValueError(
            f"stages.{name}.trainable freezes the LLM, but no stage before it trains the LLM and "
            f"it starts from random weights (no pretrained LLM is loaded): add llm to stages.{name}.trainable"
        )


@dataclass
class TrainConfig:
    shards: str = ""  # output folder (URL) of `uniloom data run`; empty: <workspace>/data
    run_name: str = ""  # Ray Train run; rerunning the same name resumes it. Empty: univision-<preset>
    # (in `uniloom run`: univision-<preset>-<hash of what decides the weights>, workflow_stages.train_run_name)
    storage: str = ""  # Ray Train storage (local dir or fsspec/pyarrow URL); empty: <workspace>/ray_results
    export: str = ""  # consolidated safetensors; empty: <workspace>/univision/univision.safetensors
    register: bool = True  # register the export as MLflow model uniloom-univision
    # Parallelism and precision
    workers: int = 2
    cpus_per_worker: float = 1.0  # Ray resources per worker (fractional on small machines)
    # Where the workers compute: cuda (one GPU each, NCCL), cpu (gloo), or auto: cuda when
    # the Ray cluster has GPUs (pipelines/device.py)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 1  # torch intra-op threads per worker
    # CPU runs: each worker of a node on its own slice of the node's cores, as DeepSpeed's
    # launcher does with --bind_cores_to_rank (lock-stepped ranks never share a core)
    bind_cores: bool = True
    expert_parallel: int = 2  # ranks that split the experts; clipped to the number of workers
    # Shadow experts: a rank with spare time runs its own slots of a hot remote expert with
    # borrowed weights when it takes at least this many off the owner; 0: off
    # (pipelines/train/expert_parallel.py)
    shadow_min_slots: int = 32
    # The flow head's rows move from ranks with more image targets than the mean to ranks
    # with fewer when some rank is at least this many above it; 0: off
    # (pipelines/train/flow_balance.py)
    flow_balance_min_rows: int = 16
    # Workers on one machine exchange through shared memory instead of gloo: the experts'
    # all-to-alls, ZeRO 0's gradient all-reduce, the end-of-epoch flag
    # (pipelines/train/shm_comm.py). Workers on several machines use gloo/NCCL regardless
    shm_collectives: bool = True
    zero_stage: Literal[0, 1, 2] = 1
    # torch.compile each layer's attention and each flow-head block (train/module.py
    # compile_dense); `uniloom bench train --compile` measures what it buys
    compile: bool = False
    # bf16: autocast over fp32 weights; auto: bf16 on GPUs and on CPUs that run it faster
    # than fp32, decided on each worker's machine (pipelines/precision.py)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Batches: packed rows of seq_len tokens
    seq_len: int = 256
    micro_batch: int = 2  # packed rows per worker per micro step
    grad_accum: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # Data
    seed: int = 0
    shuffle_buffer: int = 64  # rows, per worker
    guidance_drop: float = 0.1  # share of generation samples trained unconditionally (half text, half turn)
    # MingTok: the std bound of the noise on what the model reads of the images it draws
    # (pipelines/train/module.py); the flow targets stay clean. 0: off
    input_noise: float = 0.0
    vqa_share: float = 0.5  # share of understanding samples that are VQA (rest: captioning)
    read_cpus: float = 0.25  # Ray CPUs per Parquet read task
    # Loop
    log_every: int = 5
    checkpoint_every: int = 50  # steps; the end of every stage is checkpointed too
    keep_checkpoints: int = 3
    eval_every: int = 0  # steps; 0: at the end of each stage only
    # Learning curves: GenEval, VQA and edit success on this many validation-split scenes
    # at every evaluation point (eval_every, and each stage's end), logged as curve/<metric>
    # with the EMA weights; every worker takes part (sharded experts). 0: off
    curve_scenes: int = 0
    eval_prompts: list[str] = field(
        default_factory=lambda: ["a red circle", "a blue square left of a green triangle"]
    )
    max_failures: int = 2  # worker failures Ray Train recovers from (restart from the last checkpoint)
    # Weight EMA of what each stage trains, for evaluation samples and the export (train/ema.py),
    # updated after every optimizer step; 0: off
    ema_decay: float = 0.0
    stages: dict[str, StageConfig] = field(default_factory=_paper_recipe)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.expert_parallel < 1 or self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError("workers, expert_parallel, micro_batch and grad_accum must be >= 1")
        if not self.stages:
            raise ValueError("stages: the recipe needs at least one stage")
        check_llm_trains_first(self.stages)
        if len(self.betas) != 2:
            raise ValueError("betas: two numbers")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")
        if self.input_noise < 0:
            raise ValueError("input_noise must be >= 0")
