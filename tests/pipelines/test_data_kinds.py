"""The data stage with each tokenizer kind (tokenizer.kind), without Ray (the stages run in
this process, as tests/pipelines/test_data_runner.py does): UniTok codes stored as
integers and TUNA latents as floats, each equal to what the kind's full model makes of the
stored pixels; the kind and fingerprint in the manifest and the files' metadata; and a
unified model of another kind refusing the shards in one line."""

from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from uniloom.models.tuna_config import TunaConfig
from uniloom.models.unitok_config import UniTokConfig
from uniloom.pipelines.config import CorpusConfig, UniloomConfig, load_config
from uniloom.pipelines.corpus.synth import synthesize
from uniloom.pipelines.data.commit import Committer
from uniloom.pipelines.data.image_tokenizer import Encoder, save_random_weights
from uniloom.pipelines.data.manifest import Manifest
from uniloom.pipelines.data.prepare import Prepare
from uniloom.pipelines.data.runner import _load_index, prepare_run, record_run
from uniloom.pipelines.data.source import read_marked
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.tokenizer.data import read_tars
from uniloom.pipelines.tokenizer.data import shard_paths as corpus_tars
from uniloom.pipelines.tokenizer.kinds import KINDS
from uniloom.pipelines.train.data import check_image_kind, find_shards

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = {
    "unitok": UniTokConfig(
        image_size=32,
        patch_size=8,
        enc_width=32,
        enc_depth=1,
        dec_width=32,
        dec_depth=1,
        code_dim=16,
        num_codebooks=4,
        codebook_size=32,
    ),  # fmt: skip
    "tuna": TunaConfig(
        image_size=32,
        vae_patch_size=8,
        latent_channels=4,
        vae_width=32,
        vae_depth=1,
        rep_patch_size=1,
        rep_width=32,
        rep_depth=1,
        llm_width=32,
        head_depth=1,
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthesize(
        CorpusConfig(num=8, shards=1, size=32, seed=5), tmp_path_factory.mktemp("c") / "corpus"
    )[0]


def data_run(kind: str, corpus, tmp_path) -> tuple[str, str]:
    """A data run of the corpus with a random tokenizer of `kind`: (output, weights)."""
    cfg = UniloomConfig(**{kind: CONFIGS[kind]})
    cfg.tokenizer.kind = kind
    cfg.data.tokenizer_weights = save_random_weights(CONFIGS[kind], str(tmp_path / f"{kind}.safetensors"), 1)
    cfg.data.bpe_vocab_size = 300
    cfg.data.precision = "fp32"  # the comparison with the full model below is exact
    out = str(tmp_path / "out")
    state = prepare_run(cfg, [str(corpus.parent)], out)
    cfg, manifest, p = state["cfg"], state["manifest"], state["plan"]
    spec = record_run(manifest, state, [str(corpus.parent)])
    manifest.save()
    prep = Prepare(cfg.data, CONFIGS[kind].image_size, state["text"])
    enc = Encoder(asdict(CONFIGS[kind]), cfg.data.tokenizer_weights, {}, asdict(cfg.data.exec), "float32",
                  cfg.data.precision, kind)  # fmt: skip
    committer = Committer(manifest, p.todo, state["hashes"], state["stage"], _load_index(cfg.data, manifest, []),
                          spec)  # fmt: skip
    for shard in p.todo:
        for block in read_marked(shard, cfg.data):
            committer.add(enc(prep(block)))
    committer.finish()
    manifest.save()
    return out, cfg.data.tokenizer_weights


@pytest.mark.parametrize("kind", ["unitok", "tuna"])
def test_each_kind_stores_its_own_values(kind, corpus, tmp_path):
    out, weights = data_run(kind, corpus, tmp_path)
    recorded = Manifest.load(out, {}).data["image_tokenizer"]
    assert recorded["kind"] == kind and recorded["weights"] == weights and len(recorded["fingerprint"]) == 16
    shards = find_shards(out, {})
    assert shards.image_kind == kind
    assert pq.read_metadata(shards.files[0]).metadata[b"uniloom.image_kind"] == kind.encode()
    table = pq.read_table(shards.files[0])
    rows = table.to_pylist()
    k, tok_cfg = KINDS[kind], CONFIGS[kind]
    dtype = {"unitok": "int16", "tuna": "float32"}[kind]
    assert {r["latent_dtype"] for r in rows} == {dtype}
    assert {tuple(r["latent_shape"]) for r in rows} == {k.token_shape(tok_cfg)}
    stored = np.stack([np.frombuffer(r["latents"], dtype).reshape(r["latent_shape"]) for r in rows])
    # what the kind's full model makes of the same pixels (the corpus is already 32 px)
    torch.manual_seed(1)
    model = k.build(tok_cfg).eval()
    samples = read_tars(corpus_tars(corpus.parent), 32)
    by_key = dict(zip(samples.keys, samples.images))
    pixels = torch.from_numpy(np.stack([by_key[r["key"]] for r in rows])).float().div(127.5).sub(1.0)
    with torch.inference_mode():
        expected = k.values(model, pixels).numpy()
    if kind == "unitok":
        assert np.issubdtype(stored.dtype, np.integer) and stored.max() < tok_cfg.codebook_size
        np.testing.assert_array_equal(stored, expected)
    else:
        np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)


def test_a_model_of_another_kind_refuses_the_shards_in_one_line(corpus, tmp_path):
    out, _ = data_run("unitok", corpus, tmp_path)
    shards = find_shards(out, {})
    check_image_kind(shards, load_config("tiny", overrides=["tokenizer.kind=unitok"]).model.image_kind)
    tuna_model = load_config("tiny", overrides=["tokenizer.kind=tuna"]).model
    with pytest.raises(UniloomError) as refused:
        check_image_kind(shards, tuna_model.image_kind)
    message = str(refused.value)
    assert "\n" not in message
    assert "hold unitok image tokens, but the model reads tuna" in message
    assert "tokenizer.kind=unitok" in message
