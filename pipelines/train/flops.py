"""Model FLOPs of training steps, counted as torchtitan and Megatron count them, and MFU.

Training FLOPs of a matmul weight are 6 per row it multiplies (2 in the forward pass, 4 in
the backward: the input's and the weight's gradients; 4 in all where the input is data and
needs no gradient); embedding lookups, norms, biases and position tables are not matmuls
and count nothing. Attention adds 12 x L x heads x
head_dim x T per token (QK^T and AV: 2 matmuls forward, 4 backward, 2 FLOPs each; the
causal and document masks' sparsity is not subtracted, as by convention). What runs per
what, in the unified model:

    every token       attention projections, shared experts, one gate (of the two) and k of
                      E routed experts of every layer (torchtitan's "active" parameters),
                      plus the attention term at T = train.seq_len
    text target       the LM head: logits exist only where a text loss falls
                      (kernels/linear_ce.py), not at every token
    image slot        the kind's input side (model.image_kind):
                        mingtok  the projector; MingTok's semantic decoder, whose features
                                 are the slots' inputs (6x and 12 L W N attention when the
                                 stage trains it, 2x and 4 L W N, the forward pass, when
                                 it is frozen)
                        unitok   nothing: the code embedding is a lookup
                        tuna     TUNA's representation encoder (its patch embedding reads
                                 the latent: data) and connector
    image target      the kind's image head:
                        mingtok  vis_head, the coarse-code head (model.coarse_codes; its
                                 embedding is a lookup), and the flow head flow_batch_mul
                                 times (MAR's draws)
                        unitok   the depth head: its projection, the K depths through its
                                 blocks (attention over K) and one sub-codebook classifier each
                        tuna     the velocity head over the image block (attention over 1 + N);
                                 its blocks' modulation and the time token run once per
                                 image and are not counted

MFU is these FLOPs per second over the device's dense bf16 peak (PEAK_BF16, by device
name). On a CPU there is no such published peak: MFU is reported as not applicable there,
and the achieved TFLOP/s are reported alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from uniloom.pipelines.config import UniloomConfig
from uniloom.pipelines.model_info import build_on_meta, matmul_weights

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets. First
# match of a substring of torch.cuda.get_device_name() wins: specific names before the
# names they contain ("H100 PCIe" before "H100", "L40S" before "L4", "A100" before "A10").
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # GH200 too
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("MI300X", 1307e12),
)


def peak_bf16(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU called `device_name`, or None when unknown."""
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


@dataclass
class TrainingFlops:
    """Training FLOPs (forward + backward) per unit of a batch (module docstring)."""

    per_token: float
    per_text_target: float
    per_image_slot: float
    per_image_target: float

    @classmethod
    def of(cls, cfg: UniloomConfig, semantic_decoder_trains: bool = True) -> TrainingFlops:
        m = cfg.model
        model, tok = build_on_meta(cfg)
        layers = list(model.layers)
        # One routed expert's three matrices (w1, w2, w3: F x D each), k of them per token.
        expert = 3 * m.expert_ffn * m.hidden
        dense = matmul_weights(*(layer.attn for layer in layers), *(layer.moe.shared for layer in layers))
        gate = m.hidden * m.num_experts * m.num_layers
        attention = 12 * m.num_layers * m.num_heads * m.head_dim * cfg.train.seq_len
        per_slot, per_target = IMAGE_FLOPS[m.image_kind](model, tok, semantic_decoder_trains)
        return cls(
            per_token=6 * (dense + gate + m.experts_per_token * expert * m.num_layers) + attention,
            per_text_target=6 * matmul_weights(model.lm_head),
            per_image_slot=per_slot,
            per_image_target=per_target,
        )

    def total(self, counts: dict[str, int]) -> float:
        """FLOPs of batches with these `batch_counts`."""
        return (
            self.per_token * counts.get("tokens", 0)
            + self.per_text_target * counts.get("text_targets", 0)
            + self.per_image_slot * counts.get("image_slots", 0)
            + self.per_image_target * counts.get("image_targets", 0)
        )


def _data_in(*layers) -> int:
    """What the first matmuls of inputs that are data (latents, flow times, noised latents;
    the features when the semantic decoder is frozen) save: no input gradient, 4 not 6."""
    return 2 * sum(layer.weight.numel() for layer in layers)


def _mingtok(model, tok, semantic_decoder_trains: bool) -> tuple[float, float]:
    t = tok.cfg
    decoder, head = tok.semantic_decoder, model.flow_head
    if semantic_decoder_trains:
        per_slot = 6 * matmul_weights(model.projector) + 6 * matmul_weights(decoder) - _data_in(decoder.proj)
        per_slot += 12 * t.sem_depth * t.sem_width * t.num_tokens
    else:  # the decoder's forward pass only, under no_grad
        per_slot = 6 * matmul_weights(model.projector) - _data_in(model.projector[0])
        per_slot += 2 * matmul_weights(decoder) + 4 * t.sem_depth * t.sem_width * t.num_tokens
    flow = 6 * matmul_weights(head) - _data_in(head.time_embed.mlp[0], head.input_proj)
    per_target = 6 * matmul_weights(model.vis_head, *model.coarse_modules()) + model.cfg.flow_batch_mul * flow
    return per_slot, per_target


def _unitok(model, tok, _trains: bool) -> tuple[float, float]:
    m, head = model.cfg, model.depth_head
    K = m.num_codebooks
    depths = K * 6 * matmul_weights(head.blocks) + 12 * m.depth_layers * m.depth_width * K * K
    return 0.0, 6 * matmul_weights(head.proj) + depths + 6 * head.out_KVW.numel()


def _tuna(model, tok, _trains: bool) -> tuple[float, float]:
    c, rep = tok.cfg, tok.rep_encoder
    per_slot = 6 * (matmul_weights(rep) + rep.patch_embed.weight.numel()) - _data_in(rep.patch_embed)
    per_slot += 12 * c.rep_depth * c.rep_width * c.num_tokens + 6 * matmul_weights(tok.connector)
    blocks = matmul_weights(*(module for block in tok.head for module in (block.attn, block.mlp)))
    attention = 12 * c.head_depth * c.llm_width * (1 + c.num_tokens)
    return per_slot, 6 * (blocks + matmul_weights(tok.head_out)) + attention


# per image kind: (its model, its tokenizer, whether the semantic decoder trains) ->
# (FLOPs per image slot, per image target)
IMAGE_FLOPS = {"mingtok": _mingtok, "unitok": _unitok, "tuna": _tuna}

COUNTS = ("tokens", "text_targets", "image_slots", "image_targets")


def batch_counts(batch) -> dict[str, int]:
    """What a packed batch holds of each unit TrainingFlops counts (padding is no token)."""
    import torch

    from uniloom.models.sequence import IGNORE

    values = torch.stack(
        [
            (batch.doc_ids >= 0).sum(),
            (batch.text_targets != IGNORE).sum(),
            batch.image_mask.sum(),
            batch.image_targets.sum(),
        ]
    ).tolist()  # one device-to-host copy
    return dict(zip(COUNTS, map(int, values)))


def add_counts(total: dict[str, int], counts: dict[str, int]) -> None:
    for key in COUNTS:
        total[key] = total.get(key, 0) + counts[key]
