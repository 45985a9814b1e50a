"""Resolve `--model` for inference commands: an exported safetensors file (a path or any
fsspec URL, `s3://.../univision.safetensors`) or an MLflow model URI (models:/NAME@ALIAS,
runs:/..., a logged model's folder on a store)."""

from __future__ import annotations

from uniloom.pipelines.config import UniloomConfig
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.evaluate.univision import Bundle, load_bundle, on_device
from uniloom.pipelines.workspace import fetched


def resolve_model(cfg: UniloomConfig, model: str | None) -> Bundle:
    """The model and its image tokenizer on eval.device (resolved on this machine)."""
    return on_device(_load(cfg, model), cfg.eval)


def _load(cfg: UniloomConfig, model: str | None) -> Bundle:
    from uniloom.pipelines.train.trainer import export_path, shards_uri

    if model and ":/" in model and not model.endswith(".safetensors"):
        import mlflow

        from uniloom.pipelines.tracking import configure

        configure(cfg)
        try:
            loaded = mlflow.pyfunc.load_model(model)
        except Exception as e:  # MLflow raises several types for a missing model or alias
            raise UniloomError(f"cannot load model {model}: {str(e).splitlines()[0]}") from None
        python_model = loaded.unwrap_python_model()
        if not hasattr(python_model, "text"):
            raise UniloomError(f"{model} is not a uniloom-univision model")
        return Bundle(python_model.model, python_model.tokenizer, python_model.text, {})
    with fetched(cfg, model or export_path(cfg)) as path:  # a remote file: copied here, then removed
        if not path.is_file():
            raise UniloomError(f"unknown model {model or path}: no such file or MLflow model URI")
        return load_bundle(str(path), shards_uri(cfg), cfg.data.storage_options)
