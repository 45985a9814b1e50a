"""train.compile: each layer's attention and each flow-head block compiled in place; the
loss and every gradient are the eager model's, and the state dict keeps its names (the
checkpoints and exports do not change)."""

import torch

from uniloom.models import sequence as sq
from uniloom.models.mingtok import MingTokConfig
from uniloom.models.special_tokens import SPECIAL_TOKENS
from uniloom.models.univision import UniVisionConfig
from uniloom.pipelines.config import load_config
from uniloom.pipelines.train.module import Trainee, compile_dense

TOK = MingTokConfig(image_size=32, patch_size=8, latent_dim=8, enc_width=32, enc_depth=1, enc_heads=2,
                    sem_width=32, sem_depth=1, sem_heads=2, pix_width=32, pix_depth=1, pix_heads=2,
                    pix_patch_size=4)  # fmt: skip
CFG = UniVisionConfig(vocab_size=len(SPECIAL_TOKENS) + 8, hidden=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=8, num_experts=2, experts_per_token=1, expert_ffn=16, semantic_dim=TOK.sem_width,
                      latent_dim=TOK.latent_dim, flow_width=8, flow_depth=2)  # fmt: skip


def loss_and_grads(trainee: Trainee, batches) -> list:
    out = []
    for batch in batches:  # two batches with different image counts: the flow head's rows change
        torch.manual_seed(1)  # the flow loss's timesteps and noise
        trainee.zero_grad()
        total = trainee(batch).total
        total.backward()
        out.append(
            (total.detach(), {n: p.grad.clone() for n, p in trainee.named_parameters() if p.grad is not None})
        )
    return out


def test_compiled_attention_and_flow_blocks_train_as_the_eager_ones():
    torch.manual_seed(0)
    z = torch.randn(3, TOK.num_tokens, TOK.latent_dim)
    ids = [len(SPECIAL_TOKENS) + i for i in range(3)]
    one = [sq.text_to_image(ids, z[0]), sq.understanding(z[1], ids, ids)]
    two = [sq.text_to_image(ids, z[1]), sq.text_to_image(ids[:2], z[2])]
    batches = [sq.pack(s, 96) for s in (one, two)]
    torch.manual_seed(0)
    eager = Trainee(CFG, TOK)
    compiled = Trainee(CFG, TOK)
    compiled.load_state_dict(eager.state_dict())
    names = compile_dense(compiled)
    assert names == ["model.layers.0.attn", "model.layers.1.attn", "model.flow_head.blocks.0",
                     "model.flow_head.blocks.1"]  # fmt: skip
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for (loss_e, grads_e), (loss_c, grads_c) in zip(
        loss_and_grads(eager, batches), loss_and_grads(compiled, batches)
    ):
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        assert grads_c.keys() == grads_e.keys() and grads_e
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


def test_it_is_off_by_default_and_set_by_the_config():
    assert load_config("tiny").train.compile is False
    assert load_config("tiny", overrides=["train.compile=true"]).train.compile is True
