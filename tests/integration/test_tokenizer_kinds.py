"""UniTok and TUNA tokenizer training through the real engines (tokenizer.kind): Ray Train
runs each kind's step, the export carries the kind, MLflow registers `uniloom-unitok` and
`uniloom-tuna`, and each registered pyfunc loads and encodes images into its kind's
tokens (codes as integers, latents as floats) as its signature says."""

from __future__ import annotations

import numpy as np
import pytest
from smallkinds import SMALL as ALL_KINDS

from uniloom.pipelines.config import CorpusConfig, load_config
from uniloom.pipelines.corpus.synth import synthesize
from uniloom.pipelines.tokenizer.kinds import KINDS
from uniloom.pipelines.tokenizer.weights import load_tokenizer

pytestmark = pytest.mark.integration

SMALL = {kind: ALL_KINDS[kind] for kind in ("unitok", "tuna")}


def test_unitok_and_tuna_train_register_and_encode(ray_local, tmp_path):
    import mlflow

    from uniloom.pipelines.tokenizer.train import train_tokenizer

    synthesize(CorpusConfig(num=24, shards=3, size=32), tmp_path / "corpus")
    images = np.full((2, 32, 32, 3), 128, np.uint8)
    images[1, 8:24, 8:24] = (200, 30, 30)
    for kind, sizes in SMALL.items():
        overrides = [f"{kind}.{k}={v}" for k, v in sizes.items()] + [
            f"tokenizer.kind={kind}", f"workspace={tmp_path / 'ws'}", f"tokenizer.corpus={tmp_path / 'corpus'}",
            "tokenizer.batch_size=4", "tokenizer.checkpoint_interval=2", "tokenizer.eval_interval=2",
            "tokenizer.eval_images=4", "tokenizer.probe_train=12", "tokenizer.probe_test=6", "tokenizer.steps=3",
            "tokenizer.log_interval=1",
        ]  # fmt: skip
        summary = train_tokenizer(load_config("tiny", overrides=overrides), echo=lambda _: None)
        assert summary["steps"] == 3 and summary["registered_model"] == f"uniloom-{kind}"
        assert type(load_tokenizer(summary["weights"])).__name__ == {"unitok": "UniTok", "tuna": "Tuna"}[kind]
        history = mlflow.MlflowClient().get_metric_history(summary["mlflow_run_id"], "loss/total")
        assert [m.step for m in history] == [1, 2, 3]

        model = mlflow.pyfunc.load_model(f"models:/uniloom-{kind}/{summary['registered_version']}")
        (output,) = model.metadata.get_output_schema().inputs
        tokens = model.predict({"images": images})
        tok_cfg = getattr(load_config("tiny", overrides=overrides), kind)
        assert tokens.shape == (2, *KINDS[kind].token_shape(tok_cfg))
        if kind == "unitok":
            assert output.name == "codes" and tokens.dtype == np.int64
            assert 0 <= tokens.min() and tokens.max() < sizes["codebook_size"]
        else:
            assert output.name == "latents" and tokens.dtype == np.float32 and np.isfinite(tokens).all()
