"""`uniloom bench data` end to end at a toy size: its reruns rewrite exactly what they
should. (Its timings are figures for people, so nothing here asserts on them.)"""

import pytest

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.config import UniloomConfig
from uniloom.pipelines.data.bench import bench_data
from uniloom.pipelines.data.image_tokenizer import save_random_weights

pytestmark = pytest.mark.integration

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip


def test_bench_reruns_rewrite_nothing_then_exactly_the_changed_shard(tmp_path, ray_local, report):
    cfg = UniloomConfig(workspace=str(tmp_path / "ws"))
    cfg.data.tokenizer_weights = save_random_weights(SMALL, str(tmp_path / "w.safetensors"))
    cfg.data.bpe_vocab_size = 300
    out = bench_data(cfg, tmp_path / "bench", images=60, shards=3, echo=lambda line: None)
    assert out["full_run_rows"]["read"] == 60 and out["unchanged_rerun_rewrote"] == []
    assert out["changed_shard"] == "shapes-00001.tar"
    (rewrote,) = out["one_changed_rerun_rewrote"]  # output files are named <shard>.<content hash>.parquet
    assert rewrote.rsplit(".", 2)[0] == "shapes-00001.tar"
    assert out["ceiling_images_per_s"] > 0 and out["peak_memory_gib"] > 0.1  # Ray alone is more
    report(f"bench data at 60 images: efficiency {out['efficiency']}, peak {out['peak_memory_gib']} GiB")
