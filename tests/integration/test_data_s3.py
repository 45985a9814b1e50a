"""The data stage against an S3 API (moto's server on 127.0.0.1): inputs and the MingTok
weights are read by the Ray workers, the output is committed by the driver, all through
s3fs with the endpoint and credentials passed as storage options."""

import pyarrow.dataset as pads
import pytest
import s3fs

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.config import CorpusConfig, UniloomConfig
from uniloom.pipelines.corpus.synth import synthesize
from uniloom.pipelines.data.image_tokenizer import save_random_weights
from uniloom.pipelines.data.runner import run

pytestmark = pytest.mark.integration

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def s3(s3_server):
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("corpus-bucket")
    return fs, s3_server


def test_s3_inputs_weights_and_output(s3, tmp_path, ray_local):
    fs, options = s3
    local = synthesize(CorpusConfig(num=24, shards=3, size=32, seed=4), tmp_path / "corpus")
    for path in local:
        fs.put(str(path), f"corpus-bucket/corpus/{path.name}")
    weights = save_random_weights(SMALL, str(tmp_path / "mingtok.safetensors"))
    fs.put(weights, "corpus-bucket/weights/mingtok.safetensors")
    cfg = UniloomConfig(mingtok=SMALL, workspace=str(tmp_path / "ws"))
    cfg.data.storage_options = options
    cfg.data.tokenizer_weights = "s3://corpus-bucket/weights/mingtok.safetensors"
    cfg.data.bpe_vocab_size = 300

    first = run(cfg, ["s3://corpus-bucket/corpus"], "s3://corpus-bucket/out")
    assert first["errors"] == [] and first["shards"]["processed"] == 3
    assert first["output"] == "s3://corpus-bucket/out"
    table = pads.dataset("corpus-bucket/out/shards", filesystem=fs).to_table()
    assert table.num_rows == first["output_rows"] == 24
    assert set(table.column("source").to_pylist()) == {f"s3://corpus-bucket/corpus/{p.name}" for p in local}
    assert fs.exists("corpus-bucket/out/_manifest.json") and fs.find("corpus-bucket/out/_tmp") == []
    tokenizer = fs.ls("corpus-bucket/out/tokenizer")
    assert len(tokenizer) == 1 and tokenizer[0].endswith(f"bpe-{table.column('text_tokenizer')[0]}.json")

    again = run(cfg, ["s3://corpus-bucket/corpus"], "s3://corpus-bucket/out")
    assert again["shards"]["processed"] == 0 and again["shards"]["up_to_date"] == 3
