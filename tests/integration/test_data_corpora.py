"""A Hugging Face dataset named `hf://PATH:split` through the data stage on real Ray Data:
its stream shards are read by Ray tasks (offline, as the test session is), the manifest
records the input by name, and a rerun finds every shard up to date without reading it."""

import pytest
from editsets import EDITS, QUARANTINED, write_hub_repo

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.config import UniloomConfig
from uniloom.pipelines.data.image_tokenizer import save_random_weights
from uniloom.pipelines.data.manifest import Manifest
from uniloom.pipelines.data.runner import run

pytestmark = pytest.mark.integration

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip


def test_a_hub_dataset_runs_on_ray_data_and_reruns_as_up_to_date(ray_local, tmp_path):
    write_hub_repo(tmp_path / "hub")
    cfg = UniloomConfig(mingtok=SMALL, workspace=str(tmp_path / "ws"))
    cfg.data.tokenizer_weights = save_random_weights(SMALL, str(tmp_path / "w.safetensors"))
    cfg.data.bpe_vocab_size = 300
    cfg.data.exec.encode_actors = 1
    inputs, out = [f"hf://{tmp_path / 'hub'}:train"], str(tmp_path / "out")
    summary = run(cfg, inputs, out)
    assert summary["errors"] == [] and summary["shards"]["processed"] == 2
    hub_rows = [k for k in EDITS if k.startswith("h-")]
    assert summary["rows"] == {"read": 3, "written": len(hub_rows), "quarantined": 1, "filtered": {}}
    assert Manifest.load(out, {}).data["inputs"] == inputs
    (entry,) = [e for e in Manifest.load(out, {}).shards.values() if e["rows"]["quarantined"]]
    assert entry["rows"]["read"] == 2 and QUARANTINED["h-broken"]

    again = run(cfg, inputs, out)
    assert again["shards"] == {"processed": 0, "up_to_date": 2, "removed": 0, "failed": 0}
    assert again["ray_startup_s"] == 0
