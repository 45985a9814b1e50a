"""Ming-UniVision: one autoregressive MoE decoder that reads and writes text and MingTok's
continuous image tokens.

    input ids (B, T) -> token embeddings; image-patch slots replaced by
        projector(semantic features)  (D -> hidden, GELU, hidden -> hidden)
    -> decoder blocks (GQA attention + MoE with a separate image gate) -> RMSNorm -> hidden
    hidden -> lm_head                         text logits
    hidden -> vis_head (Linear + LayerNorm) -> per-token rectified-flow head -> 32-d latent

Causal shift of the image output: the hidden state at position i predicts the latent of
slot i + 1, so <image_start> predicts the first latent and the last slot predicts
<image_end> as text.

Loss = text_loss_weight * text CE + flow_loss_weight * flow-matching MSE
       + aux_loss_weight * load-balancing loss (mean over layers),
the flow term averaged over generated latents, the text term over assistant turns (each
turn's CE averaged over its tokens first: a one-word VQA answer weighs as much as a long
caption, so answers are not drowned by caption tokens); `Losses.per_task` splits them by
task kind (token means).

Shape legend: B batch, T sequence, H hidden, V vocab, P image slots in the batch, D MingTok
semantic width, C latent channels, L layers, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from uniloom.kernels import use_triton
from uniloom.kernels.linear_ce import linear_cross_entropy
from uniloom.models.blocks import KVCache, RMSNorm, attention_mask, rope_angles
from uniloom.models.flow_head import FlowHead
from uniloom.models.sequence import IGNORE, TASKS, Batch, turn_ids
from uniloom.models.transformer import DecoderBlock
from uniloom.models.univision_config import UniVisionConfig

__all__ = ["DecoderOutput", "Losses", "UniVision", "UniVisionConfig", "image_features"]


@dataclass
class DecoderOutput:
    hidden: torch.Tensor  # (B, T, H) after the final norm
    aux_loss: torch.Tensor  # () load-balancing loss, mean over layers
    expert_load: torch.Tensor  # (L, E) token-slots routed to each expert in each layer


@dataclass
class Losses:
    total: torch.Tensor
    text: torch.Tensor  # mean over assistant turns of their mean CE (0 when the batch has none)
    flow: torch.Tensor  # mean flow-matching MSE over generated latents (0 when none)
    aux: torch.Tensor
    per_task: dict[str, float]  # "<task>/text", "<task>/flow" for the tasks present
    expert_load: torch.Tensor  # (L, E)


class UniVision(nn.Module):
    def __init__(self, cfg: UniVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.projector = nn.Sequential(
            nn.Linear(cfg.semantic_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden)
        )
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps, kernels=cfg.kernels)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.vis_head = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.flow_width), nn.LayerNorm(cfg.flow_width, eps=1e-6)
        )
        self._init_backbone()
        # The flow head keeps MAR's initialisation (zeroed modulation and output).
        self.flow_head = FlowHead(
            cfg.latent_dim,
            cfg.flow_width,
            cfg.flow_width,
            cfg.flow_depth,
            cfg.flow_mlp_mult,
            kernels=cfg.kernels,
        )

    def _init_backbone(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ forward

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.num_layers)

    def embed_inputs(self, input_ids_BT, image_features_PD=None, image_mask_BT=None):
        """Token embeddings with the image-patch slots (row-major order) replaced by the
        projected semantic features, one feature row per slot."""
        x_BTH = self.embed(input_ids_BT)
        slots = 0 if image_mask_BT is None else int(image_mask_BT.sum())
        given = 0 if image_features_PD is None else image_features_PD.shape[0]
        if slots != given:
            raise ValueError(f"{slots} image-patch slots but {given} image feature rows")
        if slots:
            projected_PH = self.projector(image_features_PD.to(x_BTH.dtype))
            # autocast computes the projector in bf16; the embeddings stay in their dtype
            x_BTH = x_BTH.masked_scatter(image_mask_BT[..., None], projected_PH.to(x_BTH.dtype))
        return x_BTH

    def forward(self, input_ids_BT, image_features_PD=None, image_mask_BT=None, *, position_ids_BT=None,
                doc_ids_BT=None, key_mask_BT=None, cache: KVCache | None = None) -> DecoderOutput:  # fmt: skip
        """Hidden states of the new tokens. key_mask hides tokens from every later query
        (padding, guidance); without position_ids a token's position is the number of
        visible tokens before it in its row (cache included)."""
        B, T = input_ids_BT.shape
        device = input_ids_BT.device
        # Tokens no query reads (padding: doc id -1, or hidden keys) take no expert slot.
        valid_BT = key_mask_BT
        if doc_ids_BT is not None:
            valid_BT = doc_ids_BT >= 0 if valid_BT is None else valid_BT & (doc_ids_BT >= 0)
        key_mask_BT = (
            torch.ones(B, T, dtype=torch.bool, device=device) if key_mask_BT is None else key_mask_BT
        )
        if position_ids_BT is None:
            past = cache.visible_count(B, device) if cache is not None else torch.zeros(B, device=device)
            km = key_mask_BT.long()
            position_ids_BT = past.long()[:, None] + km.cumsum(1) - km
        all_keys_BS = cache.extend_mask(key_mask_BT) if cache is not None else key_mask_BT
        mask = attention_mask(all_keys_BS, T, doc_ids_BT)
        x = self.embed_inputs(input_ids_BT, image_features_PD, image_mask_BT)
        cos, sin = rope_angles(position_ids_BT, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        aux, load = [], []
        for i, layer in enumerate(self.layers):
            x, stats = layer(x, cos, sin, mask, image_mask_BT, cache, i, valid_BT)
            aux.append(stats.aux_loss)
            load.append(stats.tokens_per_expert)
        return DecoderOutput(self.norm(x), torch.stack(aux).mean(), torch.stack(load))

    def logits(self, hidden):  # (..., H) -> (..., V)
        return self.lm_head(hidden)

    def flow_condition(self, hidden):  # (..., H) -> (..., flow_width)
        return self.vis_head(hidden)

    # ------------------------------------------------------------------ training loss

    def flow_pairs(self, batch: Batch, hidden_BTH):
        """The generated latents (N, C) of `batch` and the flow head's conditions (N, Z)
        that predict them: slot j's latent from the hidden state at j - 1 (same document:
        a slot always follows <image_start> or another slot)."""
        target_BT = batch.image_targets
        cond_BT = torch.zeros_like(target_BT)
        cond_BT[:, :-1] = target_BT[:, 1:]
        return batch.image_latents[target_BT[batch.image_mask]], self.flow_condition(hidden_BTH[cond_BT])

    def loss(self, batch: Batch, image_features_PD=None) -> Losses:
        """The training objective of a (packed) batch; image_features_PD are the MingTok
        semantic features of batch.image_latents (see `image_features`)."""
        out = self(batch.input_ids, image_features_PD, batch.image_mask,
                   position_ids_BT=batch.position_ids, doc_ids_BT=batch.doc_ids)  # fmt: skip
        h_BTH = out.hidden
        zero = h_BTH.sum() * 0  # keeps the graph connected when a kind of target is absent

        text_sel = batch.text_targets != IGNORE  # (B, T)
        targets_M = batch.text_targets[text_sel]
        if targets_M.numel():
            weight_M = _turn_weights(turn_ids(batch)[text_sel])
            text, text_ce = self.text_loss(h_BTH[text_sel], targets_M, weight_M)
        else:
            text, text_ce = zero, torch.zeros(0, device=h_BTH.device)

        # Called with no targets too (N = 0): a flow head balanced across ranks
        # (pipelines/train/flow_balance.py) exchanges rows at every step.
        x0_NC, cond_NZ = self.flow_pairs(batch, h_BTH)
        flow_mse = self.flow_head.loss(x0_NC.to(h_BTH.dtype), cond_NZ, self.cfg.flow_batch_mul)  # (N,)
        flow = flow_mse.mean() if flow_mse.numel() else zero
        total = self.cfg.text_loss_weight * text + self.cfg.flow_loss_weight * flow
        total = total + self.cfg.aux_loss_weight * out.aux_loss
        per_task = _per_task(text_ce, batch.task_ids[text_sel], "text")
        per_task |= _per_task(flow_mse, batch.task_ids[batch.image_targets], "flow")
        return Losses(total, text, flow, out.aux_loss, per_task, out.expert_load)

    def text_loss(self, hidden_MH, targets_M, token_weight_M):
        """(sum_m token_weight_m * CE_m, CE_M detached) of the LM head at M text targets,
        chunked (kernels/linear_ce.py): the (M, V) logits never exist whole. A seam:
        `uniloom bench kernels` overrides it with eager full-logits cross-entropy."""
        return linear_cross_entropy(hidden_MH, self.lm_head.weight, targets_M, token_weight_M,
                                    triton=use_triton(self.cfg.kernels, hidden_MH.device))  # fmt: skip

    # ------------------------------------------------------------------ accounting

    def expert_parameters(self) -> list[nn.Parameter]:
        """The routed experts' weights: the parameters expert parallelism shards."""
        return [p for layer in self.layers for p in layer.moe.experts.parameters()]

    def parameter_counts(self) -> dict[str, int]:
        """Totals and per-token active counts. The backbone (embeddings, blocks, final
        norm, LM head) is what Ling-lite's published 16.8B / 2.75B count; a token uses k of
        E routed experts and one of the two gates. Vision parts are reported apart."""
        cfg = self.cfg
        n = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        vision = n(self.projector) + n(self.vis_head) + n(self.flow_head)
        backbone = n(self) - vision
        routed = sum(p.numel() for p in self.expert_parameters())
        idle_routed = routed * (cfg.num_experts - cfg.experts_per_token) // cfg.num_experts
        idle_gates = sum(
            n(layer.moe.image_router) for layer in self.layers if layer.moe.image_router is not None
        )
        active = backbone - idle_routed - idle_gates
        return {
            "backbone_total": backbone,
            "backbone_active": active,
            "vision_total": vision,
            "total": backbone + vision,
            "routed_experts": routed,
        }


def _turn_weights(turn_N):
    """(N,) weights that make sum(weight * value) the mean over turns of each turn's mean
    value: 1 / (tokens in the token's turn * turns), from the (N,) turn ids."""
    _, inverse_N, counts = turn_N.unique(return_inverse=True, return_counts=True)
    return 1.0 / (counts[inverse_N] * counts.numel()).float()


def _per_task(values_N, task_N, name: str) -> dict[str, float]:
    out = {}
    for i in task_N.unique().tolist():
        if i >= 0:
            out[f"{TASKS[i]}/{name}"] = values_N[task_N == i].mean().item()
    return out


def image_features(tokenizer, image_latents_PC, tokens_per_image: int):
    """MingTok semantic features (P, D) of a batch's slots: each run of `tokens_per_image`
    latents is one image, decoded causally in full (as in training the semantic decoder)."""
    P, C = image_latents_PC.shape
    if P % tokens_per_image:
        raise ValueError(f"{P} image slots are not whole images of {tokens_per_image} tokens")
    latents = image_latents_PC.view(P // tokens_per_image, tokens_per_image, C)
    return tokenizer.decode_semantic(latents).reshape(P, -1)
