"""MingTok in the MLflow model registry as `uniloom-mingtok`: a pyfunc that turns images
(B, H, W, 3) uint8 into normalised latents (B, N, 32)."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np

REGISTERED_NAME = "uniloom-mingtok"


class MingTokPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from uniloom.pipelines.device import local_device
        from uniloom.pipelines.tokenizer.weights import load_mingtok

        self.model = load_mingtok(context.artifacts["weights"]).to(local_device())  # the server's GPU if any

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        import torch

        if isinstance(model_input, dict):  # a request naming its tensor: {"images": array}
            model_input = model_input["images"]
        from uniloom.pipelines.device import device_of
        from uniloom.pipelines.tokenizer.data import to_unit

        images = np.asarray(model_input, dtype=np.uint8)  # (B, H, W, 3)
        x = to_unit(images.transpose(0, 3, 1, 2), device_of(self.model))
        with torch.no_grad():
            return self.model.encode(x).float().cpu().numpy()


def log_and_register(weights: Path, image_size: int, num_tokens: int, latent_dim: int, register: bool):
    """Log the pyfunc into the active run; register it when `register`. Returns the model
    info. MLflow checks that the logged model loads and encodes its input example (one
    mid-grey image) before the run goes on."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from uniloom.pipelines.tracking import pinned_requirements

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_tokens, latent_dim), "latents")]),
    )
    return mlflow.pyfunc.log_model(
        name="mingtok",
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
        artifacts={"weights": str(weights)},
        signature=signature,
        input_example={"images": np.full((1, image_size, image_size, 3), 128, np.uint8)},
        pip_requirements=pinned_requirements("torch", "numpy", "safetensors", "mlflow", "uniloom"),
        registered_model_name=REGISTERED_NAME if register else None,
    )
