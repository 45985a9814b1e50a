"""The data stage with its MingTok encoder actors on a GPU: the actor encodes what the CPU
actor encodes (bf16 against fp32), through pinned memory, and a whole data run with GPU
actors writes the latents a CPU run writes. Skipped, with the reason, where there is no CUDA."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
]

SMALL = dict(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """bf16 against fp32: within 3% of the latents' range."""
    return float(np.abs(a - b).max()) <= 0.03 * float(np.abs(b).max())


def test_the_gpu_encoder_actor_encodes_what_the_cpu_actor_encodes(tmp_path):
    from uniloom.models.mingtok_config import MingTokConfig
    from uniloom.pipelines.data.image_tokenizer import Encoder, save_random_weights

    mingtok = MingTokConfig(**SMALL)
    weights = save_random_weights(mingtok, str(tmp_path / "mingtok.safetensors"))
    exec_cfg = {"torch_threads": 1, "actor_gpus": 1.0, "encode_batch": 16}
    gpu = Encoder(asdict(mingtok), weights, {}, exec_cfg, "float32", "auto")
    cpu = Encoder(asdict(mingtok), weights, {}, {**exec_cfg, "actor_gpus": 0.0}, "float32", "fp32")
    assert (gpu.device, gpu.precision, cpu.device) == ("cuda", "bf16", "cpu")
    assert gpu.staging.is_pinned() and cpu.staging is None
    pixels = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)  # 2.5 batches
    assert close(gpu.encode(pixels), cpu.encode(pixels))


def _latents(folder) -> dict[str, np.ndarray]:
    out = {}
    for shard in sorted((folder / "shards").glob("*.parquet")):  # not the quarantine's files
        table = pq.read_table(shard, columns=["key", "latents", "latent_shape"])
        for row in table.to_pylist():
            if row["latents"] is not None:
                out[row["key"]] = np.frombuffer(row["latents"], np.float32).reshape(row["latent_shape"])
    return out


def test_a_data_run_with_gpu_encoder_actors_writes_the_latents_of_a_cpu_run(ray_local, tmp_path):
    from uniloom.models.mingtok_config import MingTokConfig
    from uniloom.pipelines.config import CorpusConfig, UniloomConfig
    from uniloom.pipelines.corpus.synth import synthesize
    from uniloom.pipelines.data.image_tokenizer import save_random_weights
    from uniloom.pipelines.data.runner import run

    synthesize(CorpusConfig(num=48, shards=2, size=32, seed=3), tmp_path / "corpus")
    mingtok = MingTokConfig(**SMALL)
    latents = {}
    for name, gpus in (("gpu", 0.5), ("cpu", 0.0)):
        cfg = UniloomConfig(mingtok=mingtok, workspace=str(tmp_path / f"ws-{name}"))
        cfg.data.tokenizer_weights = save_random_weights(mingtok, str(tmp_path / "mingtok.safetensors"))
        cfg.data.bpe_vocab_size = 400
        cfg.data.precision = "fp32" if name == "cpu" else "auto"
        cfg.data.exec.actor_gpus = gpus
        summary = run(cfg, [str(tmp_path / "corpus")], str(tmp_path / name))
        assert summary["output_rows"] > 40 and not summary["errors"], summary
        latents[name] = _latents(tmp_path / name)
    assert latents["gpu"].keys() == latents["cpu"].keys()
    for key, value in latents["cpu"].items():
        assert close(latents["gpu"][key], value), key
