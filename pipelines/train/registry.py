"""The exported unified model: loading it back, and MLflow's `uniloom-univision`, a pyfunc
that turns captions into images (B, H, W, 3) uint8 with the model's guided generation."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from uniloom.pipelines.train.trainer import REGISTERED_NAME


def load_export(path: str | Path):
    """(UniVision, MingTok, metadata) from the consolidated safetensors file; tensors
    only (safetensors), the configs come from the file's JSON metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from uniloom.models.mingtok import MingTok, MingTokConfig
    from uniloom.models.univision import UniVision, UniVisionConfig

    with safe_open(str(path), framework="pt") as f:
        metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    state = load_file(str(path))
    model = UniVision(UniVisionConfig(**metadata["model"]))
    tokenizer = MingTok(MingTokConfig(**metadata["mingtok"]))
    model.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
    tokenizer.load_state_dict(
        {k[len("tokenizer.") :]: v for k, v in state.items() if k.startswith("tokenizer.")}
    )
    return model.eval(), tokenizer.eval(), metadata


class UniVisionPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from tokenizers import Tokenizer

        self.model, self.tokenizer, _ = load_export(context.artifacts["weights"])
        self.text = Tokenizer.from_file(context.artifacts["text_tokenizer"])

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        from uniloom.models.generation import generate
        from uniloom.pipelines.tokenizer.data import to_uint8

        prompts = list(model_input["prompt"] if isinstance(model_input, dict) else model_input)
        ids = [self.text.encode(str(p), add_special_tokens=False).ids for p in prompts]
        seed = int((params or {}).get("seed", 0))
        out = generate(self.model, self.tokenizer, ids, generator=torch.Generator().manual_seed(seed))
        return to_uint8(out.images)


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ("torch", "numpy", "safetensors", "tokenizers", "mlflow", "uniloom")
    return [f"{name}=={version(name)}" for name in names]


def log_and_register(cfg, weights: Path, job: dict[str, Any], meta: dict[str, Any]):
    """Log the pyfunc into the training run; register it when `train.register`."""
    import mlflow

    from uniloom.pipelines.train.trainer import shards_uri, text_tokenizer

    tok = text_tokenizer(shards_uri(cfg), cfg.data.storage_options)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "text_tokenizer.json"
        tok.save(str(tok_path))
        with mlflow.start_run(run_id=job["mlflow_run_id"], nested=mlflow.active_run() is not None):
            mlflow.log_metrics({"final/global_step": meta["global_step"]})
            mlflow.log_dict({"losses": meta["losses"]}, "loss_curve.json")
            return mlflow.pyfunc.log_model(
                name="univision",
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
                artifacts={"weights": str(weights), "text_tokenizer": str(tok_path)},
                pip_requirements=_requirements(),
                registered_model_name=REGISTERED_NAME if cfg.train.register else None,
            )
