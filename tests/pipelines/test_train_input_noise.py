"""train.input_noise: in training the model reads the images it learns to draw with noise
on their latents, while its flow targets and the images it only reads stay clean."""

import pytest
import torch

from uniloom.models import sequence as sq
from uniloom.models.mingtok import MingTokConfig
from uniloom.models.special_tokens import SPECIAL_TOKENS
from uniloom.models.univision import UniVisionConfig
from uniloom.pipelines.config import load_config
from uniloom.pipelines.errors import ConfigError
from uniloom.pipelines.train.module import Trainee

TOK = MingTokConfig(image_size=32, patch_size=8, latent_dim=8, enc_width=32, enc_depth=1, enc_heads=2,
                    sem_width=32, sem_depth=1, sem_heads=2, pix_width=32, pix_depth=1, pix_heads=2,
                    pix_patch_size=4)  # fmt: skip
CFG = UniVisionConfig(vocab_size=len(SPECIAL_TOKENS) + 8, hidden=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=8, num_experts=2, experts_per_token=1, expert_ffn=16, semantic_dim=TOK.sem_width,
                      latent_dim=TOK.latent_dim, flow_width=8, flow_depth=1)  # fmt: skip


def batch_and_trainee(noise: float):
    torch.manual_seed(0)
    z = torch.randn(4, TOK.num_tokens, TOK.latent_dim)
    ids = [len(SPECIAL_TOKENS) + i for i in range(3)]
    # two images drawn (text to image), two only read (understanding)
    samples = [sq.text_to_image(ids, z[0]), sq.understanding(z[1], ids, ids), sq.text_to_image(ids, z[2]),
               sq.understanding(z[3], ids, ids)]  # fmt: skip
    batch = sq.pack(samples, sum(len(s) for s in samples))
    trainee = Trainee(CFG, TOK)
    trainee.input_noise = noise
    return batch, trainee


def test_only_the_drawn_images_are_read_noisy_each_at_its_own_level():
    batch, trainee = batch_and_trainee(0.5)
    clean = batch.image_latents.clone()
    read = trainee.noised(batch)
    assert torch.equal(batch.image_latents, clean)  # the batch itself is untouched
    changed_P = (read.image_latents != clean).any(-1)
    torch.testing.assert_close(changed_P, batch.image_targets[batch.image_mask])
    drawn = (read.image_latents - clean)[changed_P].view(2, TOK.num_tokens, -1)
    levels = drawn.std(dim=(1, 2))
    assert (
        0 < levels.min() and levels.max() < 0.5 * 1.5 and not torch.isclose(levels[0], levels[1], rtol=0.05)
    )
    trainee.eval()
    assert trainee.noised(batch) is batch  # evaluation reads what it drew
    trainee.train()
    trainee.input_noise = 0.0
    assert trainee.noised(batch) is batch


def test_the_flow_targets_stay_clean():
    """The loss is the model's on the clean batch with the features of the noised one:
    the same number with the same random draws, and not the loss of the noised batch."""
    batch, trainee = batch_and_trainee(0.5)
    torch.manual_seed(1)
    total = trainee(batch).total
    torch.manual_seed(1)
    read = trainee.noised(batch)
    features = trainee.kind.loss_inputs(trainee.tokenizer, read)
    torch.testing.assert_close(total, trainee.model.loss(batch, **features).total)
    torch.manual_seed(1)
    read = trainee.noised(batch)
    assert not torch.isclose(total, trainee.model.loss(read, **features).total)


def test_a_negative_level_is_refused():
    with pytest.raises(ConfigError, match="input_noise must be >= 0"):
        load_config("tiny", overrides=["train.input_noise=-0.1"])
