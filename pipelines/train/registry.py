"""The exported unified model: loading it back, and MLflow's `uniloom-univision`, a pyfunc
that generates images from prompts, answers questions about images and edits images.

An export is one safetensors file that needs nothing beside it: the UniVision weights and
its image tokenizer's (MingTok, UniTok or TUNA: model.image_kind), their configs (the
tokenizer's under its kind's name), and the text tokenizer (the BPE the shards were tokenized with) as
JSON in the file's metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train.trainer import REGISTERED_NAME

TEXT_TOKENIZER_KEY = "text_tokenizer_json"  # the BPE itself; key "text_tokenizer" is its fingerprint


def export_model(reader, out: str | Path, metadata: dict[str, Any], text) -> Path:
    """checkpoint.export with the text tokenizer `text` embedded; it must be the one the
    run trained with (`metadata["text_tokenizer"]`, its fingerprint)."""
    from uniloom.pipelines.data.text_tokenizer import fingerprint
    from uniloom.pipelines.train.checkpoint import export

    if fingerprint(text) != metadata["text_tokenizer"]:
        raise UniloomError(
            f"the shards' text tokenizer is now {fingerprint(text)}, but the run trained with "
            f"{metadata['text_tokenizer']}: a data run replaced it during training; train again"
        )
    return export(reader, out, {**metadata, TEXT_TOKENIZER_KEY: text.to_str()})


def load_export(path: str | Path, device: str = "cpu"):
    """(UniVision, its image tokenizer, metadata) from the consolidated safetensors file,
    on `device`; tensors only (safetensors), the configs come from the file's JSON metadata."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from uniloom.models.univision import UniVision, UniVisionConfig
    from uniloom.pipelines.tokenizer.kinds import KINDS

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UniloomError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
    kind = KINDS.get((metadata.get("model") or {}).get("image_kind", "mingtok"))
    if kind is None or kind.name not in metadata:
        raise UniloomError(
            f"{path}: not a uniloom-univision export (no model and image tokenizer configs in it)"
        )
    model = UniVision(UniVisionConfig(**metadata["model"]))
    tokenizer = kind.build(kind.config_cls(**metadata[kind.name]))
    model.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
    tokenizer.load_state_dict(
        {k[len("tokenizer.") :]: v for k, v in state.items() if k.startswith("tokenizer.")}
    )
    return model.to(device).eval(), tokenizer.to(device).eval(), metadata


def embedded_text_tokenizer(metadata: dict[str, Any], path: str | Path):
    """The BPE an export carries; None for an export made before exports carried it."""
    from tokenizers import Tokenizer

    from uniloom.pipelines.data.text_tokenizer import fingerprint

    if TEXT_TOKENIZER_KEY not in metadata:
        return None
    text = Tokenizer.from_str(metadata[TEXT_TOKENIZER_KEY])
    if fingerprint(text) != metadata.get("text_tokenizer"):
        raise UniloomError(
            f"{path}: its text tokenizer has fingerprint {fingerprint(text)}, its metadata records "
            f"{metadata.get('text_tokenizer')}: the file is damaged"
        )
    return text


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

        from uniloom.pipelines.device import local_device

        weights = context.artifacts["weights"]
        # served on the serving process's GPU where it has one
        self.model, self.tokenizer, metadata = load_export(weights, local_device())
        self.text = embedded_text_tokenizer(metadata, weights)
        if self.text is None:  # a version logged before exports carried their tokenizer
            self.text = Tokenizer.from_file(context.artifacts["text_tokenizer"])

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:

        from uniloom.models.generation import generate, generate_text
        from uniloom.pipelines.device import device_of, generator
        from uniloom.pipelines.evaluate.univision import Bundle
        from uniloom.pipelines.tokenizer.data import decode_image, to_unit

        rows = (
            model_input
            if isinstance(model_input, pd.DataFrame)
            else pd.DataFrame({"prompt": list(model_input)})
        )
        params = {"seed": 0, "steps": 0, "max_new_tokens": 32, **(params or {})}
        bundle = Bundle(self.model, self.tokenizer, self.text, {})
        size, where = self.tokenizer.cfg.image_size, device_of(self.model)
        out_images, out_text = [], []
        for i, row in enumerate(rows.to_dict("records")):
            task = row.get("task") or "generate"
            if task not in TASKS:
                raise ValueError(f"row {i}: unknown task {task!r}; one of {', '.join(TASKS)}")
            image = row.get("image")
            if task != "generate" and not isinstance(image, (bytes, bytearray)):
                raise ValueError(f"row {i}: task {task!r} needs an image")
            source = (
                to_unit(decode_image(image, size, f"row {i}")[None], where) if task != "generate" else None
            )
            ids = [bundle.encode(str(row["prompt"]))]
            gen = generator(where, int(params["seed"]))
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


INPUT_EXAMPLE = pd.DataFrame({"prompt": ["a red circle left of a blue square"], "task": ["generate"]})


def shards_lineage(uri: str, storage_options: dict[str, Any]) -> tuple[str, dict[str, int]]:
    """The shards' fingerprint (a hash of the per-shard fingerprints in their manifest: each
    covers the shard's input, the data config, both tokenizers and the code that made its
    rows) and their counts: shards, rows read, written, filtered and quarantined."""
    import hashlib

    from uniloom.pipelines.data.manifest import Manifest

    entries = Manifest.load(uri, storage_options).shards
    blob = json.dumps({sid: entry["fingerprint"] for sid, entry in entries.items()}, sort_keys=True)
    rows = [entry.get("rows", {}) for entry in entries.values()]
    counts = {"shards": len(entries)}
    for key in ("read", "written", "quarantined"):
        counts[f"rows_{key}"] = sum(r.get(key, 0) for r in rows)
    counts["rows_filtered"] = sum(sum(r.get("filtered", {}).values()) for r in rows)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], counts


def record_lineage(job: dict[str, Any], storage_options: dict[str, Any], version: str | None) -> None:
    """What the run trained on: its shards as the run's MLflow dataset (fingerprint and row
    counts), and, on the run and on its registered `version`, the data fingerprint and
    the image tokenizer (its registered version where the caller knows it, as `uniloom
    run` does) and text tokenizer it used."""
    from uniloom.pipelines.tracking import describe_version, log_dataset, mlflow_client

    fingerprint, counts = shards_lineage(job["shards_uri"], storage_options)
    log_dataset(job["mlflow_run_id"], "uniloom-shards", job["shards_uri"], fingerprint, counts)
    tags = {
        "data.fingerprint": fingerprint,
        "data.rows": str(counts["rows_written"]),
        "image_tokenizer": job["image_tokenizer"],
        "text_tokenizer": job["text_tokenizer"],
    }
    if job.get("tokenizer_version"):
        tags["tokenizer.name"] = job["tokenizer_name"]
        tags["tokenizer.version"] = str(job["tokenizer_version"])
    client = mlflow_client()
    for key, value in tags.items():
        client.set_tag(job["mlflow_run_id"], f"uniloom.{key}", value)
    if version is not None:
        describe_version(REGISTERED_NAME, version, tags)


def log_and_register(cfg, weights: Path, job: dict[str, Any], meta: dict[str, Any]):
    """Log the pyfunc into the training run; register it when `train.register`. Its one
    artifact is the export, text tokenizer included. MLflow checks that the logged model
    loads and answers its input example before the run goes on."""
    import mlflow

    from uniloom.pipelines.tracking import pinned_requirements

    with mlflow.start_run(run_id=job["mlflow_run_id"], nested=mlflow.active_run() is not None):
        mlflow.log_metrics({"final/global_step": meta["global_step"]})
        mlflow.log_dict({"losses": meta["losses"]}, "loss_curve.json")
        return mlflow.pyfunc.log_model(
            name="univision",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
            artifacts={"weights": str(weights)},
            signature=signature(),
            input_example=INPUT_EXAMPLE,
            pip_requirements=pinned_requirements(
                "torch", "numpy", "safetensors", "tokenizers", "mlflow", "uniloom"
            ),
            registered_model_name=REGISTERED_NAME if cfg.train.register else None,
        )
