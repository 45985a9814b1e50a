"""The `tokenizer:` config section: which visual tokenizer the workflow uses (`kind`), and
how it is trained and evaluated. The kind's architecture is the config section of its name
(`mingtok:`, `unitok:`, `tuna:`); the MingTok-only keys (masking, teachers, weight_*) are
ignored by the other kinds, which train with their papers' objectives
(pipelines/tokenizer/kinds.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TokenizerConfig:
    # The visual representation of every stage: mingtok (continuous), unitok (discrete
    # multi-codebook codes) or tuna (VAE latents through a representation encoder); the
    # unified model's image_kind follows it (pipelines/config.py)
    kind: Literal["mingtok", "unitok", "tuna"] = "mingtok"
    corpus: str = ""  # folder of corpus tars; empty: <workspace>/corpus
    heldout_shards: int = 1  # the last shards are never trained on (evaluation)
    steps: int = 2000  # the budget: the schedule runs over these steps on any machine
    # > 0: a safety cap on training time. A run it ends before `steps` says so (a WARNING on
    # stderr, `budget_cut` in the summary and the metrics); the schedule still follows steps
    max_minutes: float = 0.0
    # How the cap counts training time: wall clock, or this worker's CPU time / threads (the
    # wall time an unshared machine needs; fair when other jobs share the cores)
    budget_clock: Literal["wall", "cpu"] = "wall"
    batch_size: int = 32  # global, split over the workers
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    # bf16: forward under autocast (weights, optimiser fp32); auto: bf16 on CUDA and on CPUs
    # that run it faster than fp32 (pipelines/precision.py)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Where the workers compute: cuda (one GPU each, NCCL), cpu (gloo), or auto: cuda when
    # the Ray cluster has a GPU for every worker (pipelines/device.py)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mask_ratio: float = 0.4  # share of patches masked in a masked sample
    masked_fraction: float = 0.5  # share of samples in a batch that are masked; the rest go in whole
    weight_pixel: float = 1.0  # (c) L1 reconstruction
    weight_pixel_l2: float = 0.0  # optional MSE beside it
    weight_pixel_edge: float = 0.0  # optional L1 over the pixels near colour edges (object outlines)
    weight_latent: float = 0.1  # (a) masked latents -> image teacher
    weight_semantic: float = 0.1  # (b) masked semantic features -> text-aligned teacher
    weight_text: float = 0.1  # (d) locked-text contrastive alignment
    teacher: str = "ema"  # (a): ema | hf:<local Hugging Face model folder>
    semantic_teacher: str = "ema"  # (b): ema | hf:<path> (a CLIP/SigLIP vision tower)
    ema_decay: float = 0.996
    eval_interval: int = 200  # steps between evaluations (PSNR, SSIM, reconstruction grid)
    eval_images: int = 64  # held-out images evaluated during training
    checkpoint_interval: int = 200
    log_interval: int = 20
    seed: int = 0
    num_workers: int = 1  # Ray Train workers
    cpus_per_worker: float = 1.0  # Ray resources asked per worker
    threads: int = 2  # torch threads per worker
    materialize: bool = True  # keep the decoded corpus in the object store across epochs
    run_name: str = ""  # Ray Train run; rerunning the same name resumes it. Empty: <kind>-<preset>
    storage: str = ""  # Ray Train storage; empty: <workspace>/ray_results
    export: str = ""  # consolidated weights; empty: <workspace>/<kind>/<kind>.safetensors
    calibrate_latents: bool = True  # set the latent shift/scale to the trained latents' mean/std
    register: bool = True  # register the result as MLflow model uniloom-<kind>
    probe_train: int = 600  # single-object scenes to fit the linear probe on
    probe_test: int = 300  # and to test it on (fresh scenes, never in the corpus)
    eval_limit: int = 0  # held-out images for `tokenizer eval`; 0: all
