"""MingTok weights for the data stage: found, described by their own metadata, loaded
encoder-only, and clear errors when they are missing or do not fit."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from uniloom.models.mingtok import MingTok
from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.config import UniloomConfig
from uniloom.pipelines.data.image_tokenizer import load_encoder, resolve_weights, save_random_weights
from uniloom.pipelines.errors import UniloomError

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip


def test_missing_weights_say_how_to_get_them(tmp_path):
    cfg = UniloomConfig(workspace=str(tmp_path))
    with pytest.raises(UniloomError, match="uniloom tokenizer train"):
        resolve_weights(cfg)
    cfg.data.tokenizer_weights = str(tmp_path / "nope.safetensors")
    with pytest.raises(UniloomError, match=r"nope.safetensors do not exist: train the image tokenizer"):
        resolve_weights(cfg)


def test_the_files_own_config_wins_and_the_encoder_matches_the_full_model(tmp_path):
    cfg = UniloomConfig()  # tiny preset's MingTok: 64 px
    cfg.data.tokenizer_weights = save_random_weights(SMALL, str(tmp_path / "w.safetensors"), seed=3)
    uri, data, arch = resolve_weights(cfg)
    assert arch == SMALL and uri == cfg.data.tokenizer_weights
    encoder_only = load_encoder(arch, data, uri)
    assert encoder_only.pixel_decoder.head.weight.is_meta  # the decoders were never materialised
    torch.manual_seed(3)
    full = MingTok(SMALL).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        np.testing.assert_allclose(
            encoder_only.encode(x).numpy(), full.encode(x).numpy(), rtol=1e-5, atol=1e-6
        )


def test_a_bare_state_dict_that_does_not_fit_the_config_is_a_clear_error(tmp_path):
    path = str(tmp_path / "bare.safetensors")
    save_file(MingTok(SMALL).state_dict(), path)
    cfg = UniloomConfig()
    cfg.data.tokenizer_weights = path
    uri, data, arch = resolve_weights(cfg)
    assert arch == cfg.mingtok  # no metadata: the preset's section describes the file
    with pytest.raises(UniloomError, match="do not fit the config's mingtok section"):
        load_encoder(arch, data, uri)
