"""The exported unified model: loading it back, and MLflow's `uniloom-univision`, a pyfunc
that generates images from prompts, answers questions about images and edits images."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

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


TASKS = ("generate", "answer", "edit")


def signature():
    """Rows of (prompt, optional image as PNG/JPEG bytes, optional task) in; rows of
    (image as PNG bytes, text) out. `generate` draws the prompt (text empty), `answer`
    answers the prompt about the image (image empty), `edit` edits the image as the
    prompt says. Binary columns travel base64-encoded in MLflow's JSON."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("binary", "image", required=False),
                       ColSpec("string", "task", required=False)]),
        outputs=Schema([ColSpec("binary", "image"), ColSpec("string", "text")]),
        params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("steps", "long", 0),
                            ParamSpec("max_new_tokens", "long", 32)]),
    )  # fmt: skip


class UniVisionPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from tokenizers import Tokenizer

        self.model, self.tokenizer, _ = load_export(context.artifacts["weights"])
        self.text = Tokenizer.from_file(context.artifacts["text_tokenizer"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        import torch

        from uniloom.models.generation import generate, generate_text
        from uniloom.pipelines.evaluate.univision import Bundle
        from uniloom.pipelines.tokenizer.data import decode_image, to_unit

        rows = (
            model_input
            if isinstance(model_input, pd.DataFrame)
            else pd.DataFrame({"prompt": list(model_input)})
        )
        params = {"seed": 0, "steps": 0, "max_new_tokens": 32, **(params or {})}
        bundle = Bundle(self.model, self.tokenizer, self.text, {})
        size = self.tokenizer.cfg.image_size
        out_images, out_text = [], []
        for i, row in enumerate(rows.to_dict("records")):
            task = row.get("task") or "generate"
            if task not in TASKS:
                raise ValueError(f"row {i}: unknown task {task!r}; one of {', '.join(TASKS)}")
            image = row.get("image")
            if task != "generate" and not isinstance(image, (bytes, bytearray)):
                raise ValueError(f"row {i}: task {task!r} needs an image")
            source = to_unit(decode_image(image, size, f"row {i}")[None]) if task != "generate" else None
            ids = [bundle.encode(str(row["prompt"]))]
            gen = torch.Generator().manual_seed(int(params["seed"]))
            if task == "answer":
                turn = generate_text(self.model, ids, tokenizer=self.tokenizer, images=source,
                                     max_new_tokens=int(params["max_new_tokens"]))  # fmt: skip
                out_images.append(b"")
                out_text.append(bundle.decode(turn.ids[0]))
            else:
                turn = generate(self.model, self.tokenizer, ids, source_images=source,
                                steps=int(params["steps"]) or None, generator=gen)  # fmt: skip
                out_images.append(_encode_png(turn.images[0]))
                out_text.append("")
        return pd.DataFrame({"image": out_images, "text": out_text})


def _encode_png(image) -> bytes:
    import io

    from PIL import Image

    from uniloom.pipelines.tokenizer.data import to_uint8

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image[None])[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def log_and_register(cfg, weights: Path, job: dict[str, Any], meta: dict[str, Any]):
    """Log the pyfunc into the training run; register it when `train.register`."""
    import mlflow

    from uniloom.pipelines.tracking import pinned_requirements
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
                signature=signature(),
                pip_requirements=pinned_requirements(
                    "torch", "numpy", "safetensors", "tokenizers", "mlflow", "uniloom"
                ),
                registered_model_name=REGISTERED_NAME if cfg.train.register else None,
            )
