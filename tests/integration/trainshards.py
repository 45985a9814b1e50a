"""Small Parquet shards for the training tests, made by the real data stage (Ray Data,
MingTok actors) from rendered scenes of the synthetic corpus, once per test session, plus
the small config the training tests share (a 2-layer, 4-expert model over 16 latents)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from uniloom.models.mingtok_config import MingTokConfig

SMALL_MINGTOK = dict(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4, latent_shift=0.0, latent_scale=1.0,
)  # fmt: skip
SMALL_MODEL = dict(
    vocab_size=512, hidden=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, num_experts=4,
    experts_per_token=2, expert_ffn=64, num_shared_experts=1, semantic_dim=64, flow_width=64, flow_depth=2,
    flow_mlp_mult=2.0, init_std=0.02,
)  # fmt: skip
STEPS = {"align": 6, "joint": 10, "sft": 6, "edit": 6}


def make_shards(base: Path, ray_local) -> dict:
    """{"shards", "weights", "workspace"}: built once under `base` (session temp)."""
    from uniloom.pipelines.config import CorpusConfig, UniloomConfig
    from uniloom.pipelines.corpus.synth import synthesize
    from uniloom.pipelines.data.image_tokenizer import save_random_weights
    from uniloom.pipelines.data.runner import run

    out = {"shards": str(base / "out"), "weights": str(base / "mingtok.safetensors"), "base": base}
    if (base / "done").exists():
        return out
    base.mkdir(parents=True, exist_ok=True)
    synthesize(CorpusConfig(num=96, shards=2, size=32, seed=3), base / "corpus")
    mingtok = MingTokConfig(**SMALL_MINGTOK)
    cfg = UniloomConfig(mingtok=mingtok, workspace=str(base / "data-ws"))
    save_random_weights(mingtok, out["weights"])
    cfg.data.tokenizer_weights = out["weights"]
    cfg.data.bpe_vocab_size = 400
    cfg.data.exec.encode_batch = 32
    summary = run(cfg, [str(base / "corpus")], out["shards"])
    assert summary["output_rows"] > 80, summary
    # Every scene carries its whole 3-round edit chain: an instruction and a target per round.
    for shard in sorted((base / "out" / "shards").glob("*.parquet")):
        for row in pq.read_table(shard, columns=["edit_instruction_ids", "edit_latents"]).to_pylist():
            assert len(row["edit_instruction_ids"]) == len(row["edit_latents"]) == 3, row
    (base / "done").write_text("ok")
    return out


def config_file(path: Path, data: dict, workspace: Path, **train) -> Path:
    """A YAML config over the tiny preset: the small model, these shards, a short recipe."""
    stages = {name: {"steps": steps, "warmup_steps": 2} for name, steps in STEPS.items()}
    body = {
        "workspace": str(workspace),
        "mingtok": SMALL_MINGTOK,
        "model": SMALL_MODEL,
        "data": {"tokenizer_weights": data["weights"]},
        "train": {
            "shards": data["shards"],
            "seq_len": 128,  # holds a 3-round edit chain of 16-latent images (about 100 tokens)
            "micro_batch": 2,
            "log_every": 2,
            "checkpoint_every": 4,
            "eval_prompts": ["a red circle"],
            "shuffle_buffer": 16,
            "stages": stages,
            **train,
        },
    }
    path.write_text(yaml.safe_dump(body))
    return path


def uniloom(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """The installed console script (module-scoped fixtures cannot use `cli`)."""
    exe = str(Path(sys.executable).with_name("uniloom"))
    return subprocess.run(
        [exe, *args], cwd=cwd, env={**os.environ}, capture_output=True, text=True, timeout=timeout
    )


def draws_and_edits(model: str, workspace: Path, out: Path, size: int = 32) -> None:
    """`uniloom generate` one image with `model`, then a two-round `uniloom edit` of it:
    each exits 0 and writes images of `size` px, the edit one per round."""
    import json

    import numpy as np
    from PIL import Image

    common = ["--model", model, "--set", f"workspace={workspace}", "--steps", "2", "--json"]
    drawn = uniloom("generate", "a red circle", "--out", str(out / "gen"), *common, cwd=out)
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    (image,) = json.loads(drawn.stdout.strip().splitlines()[-1])["images"]
    assert np.asarray(Image.open(image)).shape == (size, size, 3)
    edited = uniloom("edit", image, "--instruction", "make the circle blue", "--instruction", "move it left",
                     "--out", str(out / "edit"), *common, cwd=out)  # fmt: skip
    assert edited.returncode == 0, edited.stderr[-3000:]
    rounds = json.loads(edited.stdout.strip().splitlines()[-1])["images"]
    assert [Path(p).name for p in rounds] == ["round1-0.png", "round2-0.png"]
    assert all(np.asarray(Image.open(p)).shape == (size, size, 3) for p in rounds)
