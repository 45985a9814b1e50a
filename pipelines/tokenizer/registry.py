"""The tokenizer in the MLflow model registry as `uniloom-<kind>` (uniloom-mingtok,
uniloom-unitok, uniloom-tuna): a pyfunc that turns images (B, H, W, 3) uint8 into the
kind's image tokens (B, N, X): MingTok's normalised latents, UniTok's codes, TUNA's
normalised VAE latent tokens (pipelines/tokenizer/kinds.py)."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np


class TokenizerPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from uniloom.pipelines.device import local_device
        from uniloom.pipelines.tokenizer.kinds import kind_for
        from uniloom.pipelines.tokenizer.weights import load_tokenizer

        self.model = load_tokenizer(context.artifacts["weights"]).to(
            local_device()
        )  # the server's GPU if any
        self.kind = kind_for(self.model)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        import torch

        if isinstance(model_input, dict):  # a request naming its tensor: {"images": array}
            model_input = model_input["images"]
        from uniloom.pipelines.device import device_of
        from uniloom.pipelines.tokenizer.data import to_unit

        images = np.asarray(model_input, dtype=np.uint8)  # (B, H, W, 3)
        x = to_unit(images.transpose(0, 3, 1, 2), device_of(self.model))
        with torch.no_grad():
            values = self.kind.values(self.model, x)
        return values.cpu().numpy() if values.dtype == torch.long else values.float().cpu().numpy()


def log_and_register(weights: Path, kind, tok_cfg, float_dtype: str, register: bool):
    """Log the pyfunc of `kind` (its config `tok_cfg`) into the active run; register it
    when `register`. Returns the model info. MLflow checks that the logged model loads and
    encodes its input example (one mid-grey image) before the run goes on."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from uniloom.pipelines.tracking import pinned_requirements

    size = tok_cfg.image_size
    codes = np.issubdtype(np.dtype(kind.dtype(tok_cfg, float_dtype)), np.integer)
    out = TensorSpec(np.dtype(np.int64 if codes else np.float32), (-1, *kind.token_shape(tok_cfg)),
                     "codes" if codes else "latents")  # fmt: skip
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3), "images")]), outputs=Schema([out])
    )
    return mlflow.pyfunc.log_model(
        name=kind.name,
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
        artifacts={"weights": str(weights)},
        signature=signature,
        input_example={"images": np.full((1, size, size, 3), 128, np.uint8)},
        pip_requirements=pinned_requirements("torch", "numpy", "safetensors", "mlflow", "uniloom"),
        registered_model_name=kind.registered_name if register else None,
    )


WEIGHTS_TAG = "weights.fingerprint"  # on a version: the fingerprint the data stage gives its weights


def tag_weights(cfg, name: str, version: str, weights: Path) -> None:
    """Tag version `version` of `name` with the fingerprint of its weights file as the data
    stage and training compute it (image_tokenizer.fingerprint of the file's own config),
    so a run that only has the weights finds the version."""
    import dataclasses

    from uniloom.pipelines.data.image_tokenizer import fingerprint, resolve_weights
    from uniloom.pipelines.tracking import describe_version

    local = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_weights=str(weights)))
    _, blob, tok_cfg = resolve_weights(local)
    describe_version(name, version, {WEIGHTS_TAG: fingerprint(tok_cfg, blob)})


def version_of_weights(name: str, weights_fingerprint: str) -> str | None:
    """The newest registered version of `name` whose weights have this fingerprint (None:
    none, or no such registered model)."""
    from mlflow.exceptions import MlflowException

    from uniloom.pipelines.tracking import mlflow_client

    try:
        versions = mlflow_client().search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    found = [int(v.version) for v in versions if v.tags.get(WEIGHTS_TAG) == weights_fingerprint]
    return str(max(found)) if found else None


# The name the models-from-code files of versions logged before the kinds import.
MingTokPyfunc = TokenizerPyfunc
