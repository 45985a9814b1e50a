"""A tokenizer version carries its weights' fingerprint, so a standalone `uniloom train`
(which has only the weights file) records the tokenizer's registered version as lineage."""

from __future__ import annotations

import dataclasses

import mlflow

from uniloom.pipelines import tracking
from uniloom.pipelines.config import load_config
from uniloom.pipelines.data.image_tokenizer import save_random_weights
from uniloom.pipelines.tokenizer.registry import WEIGHTS_TAG, tag_weights, version_of_weights
from uniloom.pipelines.train.trainer import effective_config


def test_a_run_with_only_the_weights_finds_their_registered_version(tmp_path, monkeypatch):
    cfg = load_config("tiny", overrides=[f"workspace={tmp_path / 'ws'}"])
    weights = [
        save_random_weights(cfg.mingtok, str(tmp_path / f"m{seed}.safetensors"), seed) for seed in (0, 1)
    ]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # configure() sets it; restored after
    before = mlflow.get_tracking_uri()
    try:
        tracking.configure(cfg)
        client = tracking.mlflow_client()
        assert version_of_weights("uniloom-mingtok", "0123") is None  # no such registered model yet
        client.create_registered_model("uniloom-mingtok")
        for path in weights:  # versions 1 and 2, one per weights file
            version = client.create_model_version("uniloom-mingtok", str(tmp_path), run_id=None).version
            tag_weights(cfg, "uniloom-mingtok", version, path)
        # training computes the fingerprint its own way (effective_config): the same
        for expected, path in zip(("1", "2"), weights):
            run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_weights=path))
            _, image_fp = effective_config(run_cfg)
            assert client.get_model_version("uniloom-mingtok", expected).tags[WEIGHTS_TAG] == image_fp
            assert version_of_weights("uniloom-mingtok", image_fp) == expected
        assert version_of_weights("uniloom-mingtok", "not-these-weights") is None
    finally:
        mlflow.set_tracking_uri(before)
