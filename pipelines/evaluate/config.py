"""The `eval:` config section: how many held-out scenes, sampling, and the gates that
decide whether a registered model becomes `champion`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    scenes: int = 24  # held-out scenes (generation, VQA, editing all use them)
    batch: int = 8
    seed: int = 0
    flow_steps: int = 0  # 0: the model's own flow_steps
    guidance: bool = True
    # metric -> minimum; every one must hold for the alias `champion` to move.
    gate: dict[str, float] = field(default_factory=lambda: {"vqa_accuracy": 0.5})
    tokenizer_gate: dict[str, float] = field(default_factory=lambda: {"psnr": 28.0})
