"""The joint stage's anchor: training MingTok's semantic decoder with the language-model
losses must leave the exported tokenizer rendering as well as the tokenizer stage's
(within 1 dB PSNR), which it does not without the anchor."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from uniloom.models import sequence as sq
from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.models.special_tokens import SPECIAL_TOKENS
from uniloom.models.univision import UniVisionConfig
from uniloom.pipelines.config import load_config
from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import sample_scene, scene_objects
from uniloom.pipelines.train import checkpoint as ckpt
from uniloom.pipelines.train.config import PARTS, StageConfig
from uniloom.pipelines.train.loop import anchor_tokenizer
from uniloom.pipelines.train.metrics import Window
from uniloom.pipelines.train.module import Trainee

TOK = MingTokConfig(image_size=32, patch_size=8, latent_dim=8, enc_width=32, enc_depth=1, enc_heads=2,
                    sem_width=32, sem_depth=2, sem_heads=2, pix_width=32, pix_depth=1, pix_heads=2,
                    pix_patch_size=4)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_stage():
    """A MingTok trained for 150 steps of L1 reconstruction on 16 rendered scenes (what
    the tokenizer stage hands on, in miniature), the scenes and their captions."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    scenes = [sample_scene(0, i) for i in range(16)]
    images = np.stack([np.array(render(scene_objects(s["objects"]), TOK.image_size)) for s in scenes])
    pixels = torch.tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.manual_seed(0)
    tok = MingTok(TOK)
    opt = torch.optim.AdamW(tok.parameters(), lr=3e-3)
    for _ in range(150):
        loss = (tok.decode_pixels(tok.decode_semantic(tok.encode(pixels)), clamp=False) - pixels).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    yield {k: v.detach().clone() for k, v in tok.state_dict().items()}, pixels, [s["caption"] for s in scenes]
    torch.set_num_threads(before)


def psnr(tok: MingTok, pixels) -> float:
    with torch.no_grad():
        mse = ((tok.reconstruct(pixels) - pixels) / 2).square().flatten(1).mean(1)
    return (10 * torch.log10(1 / mse)).mean().item()


def joint_stage(state, pixels, captions, anchor_weight: float, tmp_path) -> tuple[MingTok, Window]:
    """15 steps of a joint-like stage (every part trains, a deliberately high lr), then
    the export's tokenizer: checkpoint -> consolidated safetensors -> MingTok."""
    tok = MingTok(TOK)
    tok.load_state_dict(state)
    with torch.no_grad():
        z = tok.encode(pixels)
    words = sorted({w for c in captions for w in c.split()})
    ids = [[len(SPECIAL_TOKENS) + words.index(w) for w in c.split()] for c in captions]
    samples = [sq.text_to_image(i, zi) for i, zi in zip(ids, z)] + [
        sq.understanding(zi, [], i) for i, zi in zip(ids, z)
    ]
    batch = sq.pack(samples, sum(len(s) for s in samples))
    cfg = UniVisionConfig(vocab_size=len(SPECIAL_TOKENS) + len(words), hidden=32, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=16, rope_theta=100.0, init_std=0.05, num_experts=2,
                          experts_per_token=1, expert_ffn=32, num_shared_experts=0, semantic_dim=TOK.sem_width,
                          latent_dim=TOK.latent_dim, flow_width=16, flow_depth=1, flow_mlp_mult=2.0)  # fmt: skip
    torch.manual_seed(1)
    trainee = Trainee(cfg, TOK)
    trainee.tokenizer.load_state_dict(state)
    trainee.set_trainable(list(PARTS))
    trainee.anchor(state, anchor_weight)
    opt = torch.optim.AdamW([p for p in trainee.parameters() if p.requires_grad], lr=2e-2)
    window = Window()
    for _ in range(15):
        losses = trainee(batch)
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        window.add(losses, int((batch.doc_ids >= 0).sum()))
    ckpt.save(None, trainee, tmp_path, 0, 1, {"epoch": 0, "rows": 0}, {"world": 1})
    exported = load_file(ckpt.export(ckpt.Reader(tmp_path), tmp_path / "export.safetensors", {}))
    out = MingTok(TOK)
    out.load_state_dict(
        {k[len("tokenizer.") :]: v for k, v in exported.items() if k.startswith("tokenizer.")}
    )
    return out, window


def test_the_anchor_keeps_the_exported_tokenizer_within_one_db(tokenizer_stage, tmp_path):
    state, pixels, captions = tokenizer_stage
    before = MingTok(TOK)
    before.load_state_dict(state)
    reference = psnr(before, pixels)
    weight = load_config("tiny").train.stages["joint"].anchor_weight
    assert weight > 0

    loose, loose_window = joint_stage(state, pixels, captions, 0.0, tmp_path / "loose")
    anchored, window = joint_stage(state, pixels, captions, weight, tmp_path / "anchored")
    # Without the anchor the language-model losses pull the features where the frozen
    # pixel decoder cannot follow; with it the export renders as the tokenizer stage did.
    assert reference - psnr(loose, pixels) > 1.0
    assert abs(psnr(anchored, pixels) - reference) < 1.0
    assert window.reduce(1)["loss_anchor"] > 0 and loose_window.reduce(1)["loss_anchor"] == 0


def test_only_a_stage_that_trains_the_semantic_decoder_is_anchored(tokenizer_stage, monkeypatch):
    state = tokenizer_stage[0]
    monkeypatch.setattr("uniloom.pipelines.train.loop.tokenizer_state", lambda uri, options: state)
    cfg = UniVisionConfig(vocab_size=64, hidden=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                          num_experts=2, experts_per_token=1, expert_ffn=16, semantic_dim=TOK.sem_width,
                          latent_dim=TOK.latent_dim, flow_width=8, flow_depth=1)  # fmt: skip
    for trainable, weight, anchored in [(list(PARTS), 1.0, True), (list(PARTS), 0.0, False),
                                        (["projector", "flow_head", "llm"], 1.0, False)]:  # fmt: skip
        trainee = Trainee(cfg, TOK)
        anchor_tokenizer(trainee, StageConfig(trainable, anchor_weight=weight), "unused", {})
        assert (trainee.anchor_weight > 0) == anchored and bool(trainee.reference) == anchored
        if anchored:  # the tokenizer stage's semantic decoder, not the trainee's own
            assert set(trainee.reference) == set(trainee.tokenizer.semantic_decoder.state_dict())
            torch.testing.assert_close(
                trainee.reference["proj.weight"], state["semantic_decoder.proj.weight"]
            )
