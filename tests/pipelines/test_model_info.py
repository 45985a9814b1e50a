"""Parameter counts of the presets on the meta device (`uniloom model info`), the training
FLOPs `uniloom bench train` divides by for MFU, checked against torch's own count of one
forward and backward, and the table of GPU peaks."""

from __future__ import annotations

import json

import pytest
import torch

from uniloom.pipelines.config import UniloomConfig, load_config
from uniloom.pipelines.model_info import build_on_meta, parameter_counts

BACKBONE = ("embedding", "attention", "routed_experts", "shared_experts", "routers", "norms", "lm_head")
VISION = ("projector", "vis_head", "flow_head")
MINGTOK = ("mingtok_encoder", "mingtok_semantic_decoder", "mingtok_pixel_decoder")


def by_hand(cfg: UniloomConfig) -> tuple[int, int]:
    """(backbone total, active per token) from the config alone: GQA projections, E routed
    and the shared SwiGLU experts (3 matrices each), two gates, RMSNorm scales, untied
    embeddings and LM head; a token uses k of the E experts and one gate."""
    m = cfg.model
    attention = m.hidden * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    expert = 3 * m.hidden * m.expert_ffn
    shared = expert * m.num_shared_experts
    gates = m.hidden * m.num_experts * (2 if m.multi_gate else 1)
    ends = 2 * m.vocab_size * m.hidden + m.hidden  # embeddings, LM head, final norm
    layer = attention + shared + gates + 2 * m.hidden
    total = ends + m.num_layers * (layer + m.num_experts * expert)
    active = ends + m.num_layers * (
        layer + m.experts_per_token * expert - (gates // 2 if m.multi_gate else 0)
    )
    return total, active


@pytest.mark.parametrize("preset", ["tiny", "base", "paper"])
def test_each_presets_counts_add_up_and_match_a_count_by_hand(preset, report):
    cfg = load_config(preset)
    counts = parameter_counts(cfg)
    part = lambda names: sum(counts[f"part.{n}"] for n in names)  # noqa: E731
    assert part(BACKBONE) == counts["backbone_total"]
    coarse = ("coarse_head", "coarse_embed") if cfg.model.coarse_codes else ()
    assert part(VISION + coarse) == counts["vision_total"]
    if coarse:  # a head over the hidden state, an embedding of the flow head's width
        m = cfg.model
        assert part(coarse) == m.coarse_codes * (m.hidden + m.flow_width)
    assert part(MINGTOK) == counts["mingtok_total"]
    assert counts["total"] == counts["backbone_total"] + counts["vision_total"]
    assert (counts["backbone_total"], counts["active_per_tok"]) == by_hand(cfg)
    report(f"{preset}: {counts['total'] / 1e9:.3f}B total, {counts['active_per_tok'] / 1e9:.3f}B active per "
           f"token, MingTok {counts['mingtok_total'] / 1e9:.3f}B")  # fmt: skip


def test_the_base_preset_is_the_architecture_at_about_1b_parameters_for_one_gpu():
    cfg = load_config("base")
    counts = parameter_counts(cfg)
    assert 0.9e9 <= counts["total"] <= 1.1e9
    m = cfg.model
    assert m.num_shared_experts > 0 and m.experts_per_token < m.num_experts and m.multi_gate  # the image gate
    assert cfg.mingtok.image_size == 256 and m.semantic_dim == cfg.mingtok.sem_width
    assert (cfg.train.workers, cfg.train.expert_parallel, cfg.train.device) == (1, 1, "auto")
    # fp32 weights, gradients and two Adam moments of the unified model and MingTok's
    # trained semantic decoder: a fraction of one 80 GB GPU, the rest for activations
    state = 16 * (counts["total"] + counts["part.mingtok_semantic_decoder"])
    assert state < 0.3 * 80e9


def test_the_models_are_built_without_memory():
    model, tokenizer = build_on_meta(load_config("paper"))
    assert {p.device.type for p in [*model.parameters(), *tokenizer.parameters()]} == {"meta"}


def test_model_info_prints_the_counts(report):
    from click.testing import CliRunner

    from uniloom.pipelines.cli import cli

    result = CliRunner().invoke(cli, ["model", "info", "--preset", "base", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    counts = parameter_counts(load_config("base"))
    assert out["total"] == counts["total"] and out["active_per_tok"] == counts["active_per_tok"]
    assert out["flops.per_tok (seq_len 2048)"] > 6 * counts["active_per_tok"] - 12 * counts["part.embedding"]
    text = CliRunner().invoke(cli, ["model", "info", "--preset", "base"]).output
    assert "(1.020B)" in text.splitlines()[1], text  # total, for people


# ---------------------------------------------------------------------------- FLOPs


def _small() -> UniloomConfig:
    from uniloom.models.mingtok_config import MingTokConfig
    from uniloom.models.univision_config import UniVisionConfig

    # One gate: the image gate is computed for every token but decides only image tokens'
    # routing, so the model's FLOPs count one (torch's counter would see both).
    model = UniVisionConfig(vocab_size=256, hidden=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                            num_experts=4, experts_per_token=2, expert_ffn=48, num_shared_experts=1,
                            semantic_dim=64, latent_dim=32, flow_width=64, flow_depth=2, flow_mlp_mult=2.0,
                            multi_gate=False, kernels="reference")  # fmt: skip
    mingtok = MingTokConfig(image_size=32, patch_size=8, pix_patch_size=4, enc_width=64, enc_depth=1, enc_heads=2,
                            sem_width=64, sem_depth=2, sem_heads=2, pix_width=32, pix_depth=1, pix_heads=2)  # fmt: skip
    cfg = UniloomConfig(model=model, mingtok=mingtok)
    cfg.train.seq_len = 64
    return cfg


def _full_rows(cfg: UniloomConfig):
    """One row each of text, text-to-image and understanding, each exactly seq_len long:
    no padding, so every position is a token."""
    from uniloom.models import sequence

    T, N = cfg.train.seq_len, cfg.mingtok.num_tokens
    g = torch.Generator().manual_seed(0)
    image = lambda: torch.randn(N, cfg.mingtok.latent_dim, generator=g)  # noqa: E731
    makers = [
        lambda k: sequence.text_only(list(range(20, 20 + k))),
        lambda k: sequence.text_to_image(list(range(20, 20 + k)), image()),
        lambda k: sequence.understanding(image(), list(range(30, 30 + k)), [40, 41]),
    ]
    rows = [next(s for k in range(1, T) if len(s := make(k)) == T) for make in makers]
    return sequence.pack(rows, T)


def _counted(trainee, batch) -> int:
    """torch.utils.flop_counter's count of one forward and backward: attention through its
    math path (whose matmuls the counter sees; it has no formula for the CPU's fused kernel),
    and the in-place addmm_ with which the chunked cross-entropy sums the LM head's gradient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    addmm_ = lambda bias, a, b, out_shape=None, **_: 2 * a[0] * a[1] * b[1]  # noqa: E731
    trainee.zero_grad()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_}) as fc:  # fmt: skip
        trainee(batch).total.backward()
    return fc.get_total_flops()


def test_training_flops_equal_torchs_count_of_a_forward_and_backward():
    from uniloom.pipelines.train.flops import TrainingFlops, batch_counts
    from uniloom.pipelines.train.module import Trainee

    cfg = _small()
    torch.manual_seed(0)
    trainee = Trainee(cfg.model, cfg.mingtok)
    flops = TrainingFlops.of(cfg)
    batch = _full_rows(cfg)
    counts = batch_counts(batch)
    assert counts == {"tokens": 192, "text_targets": 69, "image_slots": 32, "image_targets": 16}
    assert flops.total(counts) == _counted(trainee, batch)
    # the semantic decoder frozen: its forward pass only, and no gradient into the projector's input
    trainee.set_trainable(["projector", "flow_head", "llm"])
    assert TrainingFlops.of(cfg, semantic_decoder_trains=False).total(counts) == _counted(trainee, batch)


def test_the_peak_table_names_specific_gpus_before_the_names_they_contain():
    from uniloom.pipelines.train.flops import peak_bf16

    assert peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16("NVIDIA H200") == 989e12
    assert peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16("NVIDIA L40S") == 362e12 and peak_bf16("NVIDIA L4") == 121e12
    assert peak_bf16("NVIDIA GeForce GTX 1080") is None  # unknown: MFU says so, never guesses


@pytest.mark.parametrize("kind", ["unitok", "tuna"])
def test_training_flops_of_the_other_kinds_match_torchs_count(kind):
    """UniTok: exactly (its code embedding is a lookup). TUNA: but what runs once per image
    (the time token, the velocity head blocks' modulation), which TrainingFlops leaves out."""
    from uniloom.models import sequence
    from uniloom.pipelines.tokenizer.kinds import KINDS
    from uniloom.pipelines.train.flops import TrainingFlops, batch_counts
    from uniloom.pipelines.train.module import Trainee

    cfg = _small()
    cfg.tokenizer.kind = cfg.model.image_kind = kind  # and the keys that follow (config.py DERIVED):
    cfg.model.num_codebooks, cfg.model.codebook_size = cfg.unitok.num_codebooks, cfg.unitok.codebook_size
    cfg.tuna.llm_width = cfg.model.hidden
    cfg.model.depth_width, cfg.model.depth_heads, cfg.model.depth_layers = 32, 2, 1
    cfg.unitok.image_size = cfg.tuna.image_size = 32
    kind_cfg = KINDS[kind].config(cfg)
    torch.manual_seed(0)
    trainee = Trainee(cfg.model, kind_cfg)
    N, X = KINDS[kind].token_shape(kind_cfg)
    g = torch.Generator().manual_seed(0)
    image = lambda: (torch.randint(0, kind_cfg.codebook_size, (N, X), generator=g) if kind == "unitok"  # noqa: E731
                     else torch.randn(N, X, generator=g))  # fmt: skip
    T = cfg.train.seq_len
    makers = [lambda k: sequence.text_only(list(range(20, 20 + k))),
              lambda k: sequence.text_to_image(list(range(20, 20 + k)), image()),
              lambda k: sequence.understanding(image(), list(range(30, 30 + k)), [40, 41])]  # fmt: skip
    batch = sequence.pack([next(s for k in range(1, T) if len(s := make(k)) == T) for make in makers], T)
    counted, flops = _counted(trainee, batch), TrainingFlops.of(cfg).total(batch_counts(batch))
    if kind == "unitok":
        assert flops == counted
    else:
        assert 0.97 * counted < flops < counted
