"""The `eval:` config section: how many held-out scenes, sampling, and the gates that
decide whether a registered model becomes `champion`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    scenes: int = 500  # test-split scenes (generation, VQA, editing); reported figures need >= 500
    val_scenes: int = 200  # validation-split scenes: `uniloom eval --tune` chooses sampling on them
    batch: int = 8
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 (uniloom.pipelines.precision.resolve)
    # auto | cpu | cuda: where eval, generate and edit load the model (auto: this machine's
    # GPU where it has one; pipelines/device.py)
    device: str = "auto"
    # Sampling, chosen on the validation split (`uniloom eval --tune`); None: the model's own.
    flow_steps: int = 0  # 0: the model's own flow_steps
    guidance: bool = True
    cfg_text_uncond_scale: float | None = None
    cfg_cond_scale: float | None = None
    # the flow head's starting noise scale for image latents (lower: surer, less varied
    # tokens; a per-token head sampled at 1.0 scatters an object's tokens over colours)
    temperature: float | None = None
    coarse_temperature: float | None = None  # the coarse code's softmax temperature (0: greedy)
    text_temperature: float = 0.0  # 0: greedy answers
    # What `--tune` tries: image settings scored by GenEval overall, text temperature by VQA.
    tune_grid: dict[str, list[float]] = field(
        default_factory=lambda: {
            "flow_steps": [8.0, 16.0],
            "temperature": [0.5, 1.0],
            "cfg_cond_scale": [1.5, 3.0, 5.0],
            "cfg_text_uncond_scale": [1.1],
            "text_temperature": [0.0, 0.5],
        }
    )
    # metric -> minimum; every one must hold for the alias `champion` to move. A metric
    # with a 95% interval is judged by its lower bound (`<metric>_lo`), not its value.
    gate: dict[str, float] = field(default_factory=lambda: {"vqa_accuracy": 0.5})
    # MingTok's gate, applied to the tokenizer stage's figures and to the reconstruction
    # of the MingTok exported with the unified model (eval's `tokenizer_<metric>`).
    tokenizer_gate: dict[str, float] = field(default_factory=lambda: {"psnr": 28.0})

    def __post_init__(self) -> None:
        unknown = set(self.tune_grid) - {
            "flow_steps",
            "temperature",
            "coarse_temperature",
            "cfg_cond_scale",
            "cfg_text_uncond_scale",
            "text_temperature",
        }
        if unknown:
            raise ValueError(f"tune_grid: unknown setting(s) {', '.join(sorted(unknown))}")
        if self.scenes < 1 or self.val_scenes < 1:
            raise ValueError("scenes and val_scenes must be at least 1")
