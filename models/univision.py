"""Ming-UniVision: one autoregressive MoE decoder that reads and writes text and image
tokens of one of three visual tokenizers (cfg.image_kind), through the same backbone.

    input ids (B, T) -> token embeddings, image positions replaced (`embed_inputs`)
    -> decoder blocks (GQA attention + MoE with a separate image gate) -> RMSNorm -> hidden
    hidden -> lm_head                                                   text logits

Per kind, what an image position reads and what predicts the image (each its own module):

    mingtok  slot <- projector(MingTok semantic feature)  (D -> hidden, GELU, hidden -> hidden)
             hidden -> vis_head (Linear + LayerNorm) -> per-token rectified-flow head -> 32-d latent
    unitok   slot <- sum of K code embeddings of its K codes     (models/unitok_head.py)
             hidden -> depth transformer -> the K codes, one sub-codebook at a time
    tuna     [<image_start>, slots] <- the image block of TUNA's cascade (models/tuna.py):
             [time token, connector(representation encoder(VAE latent at time t))]
             block hidden states -> TUNA's velocity head -> the whole image's velocity

Causal shift (mingtok, unitok): the hidden state at i predicts the latent (codes) of
slot i + 1, so <image_start> predicts the first and the last slot predicts <image_end> as
text. TUNA instead denoises the whole image at once: an image's block positions attend to
each other in both directions (text stays causal), a generated image enters noised at
its own t ~ U(0, 1) (understanding reads clean latents, t = 1), and the velocity head
reads the block's hidden states. The head runs on the block alone, not the sequence: its
blocks are modulated by t, so over the context they would have to rerun the whole
conversation at every sampling step; the backbone has already brought the context in.
Text after a generated image sees it noised in training and clean (t = 1) when generated,
as in TUNA, which keeps one copy of each image.

Loss = text_loss_weight * text CE + aux_loss_weight * load-balancing loss (mean over
layers) + the kind's image term: flow_loss_weight * flow-matching MSE (mingtok: over
generated latents; tuna: over generated images, TUNA weighting flow 1.0, text 0.2) or
code_loss_weight * code CE (unitok: over generated positions, mean over their K codes).
The text term averages over assistant turns (each turn's CE averaged over its tokens
first: a one-word VQA answer weighs as much as a long caption, so answers are not drowned
by caption tokens); `Losses.per_task` splits them by task kind (token or image means).

Shape legend: B batch, T sequence, H hidden, V vocab, P image slots in the batch, D MingTok
semantic width, C latent channels, K UniTok codes per position, I images, N slots per
image, X TUNA values per token, L layers, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from uniloom.kernels import use_triton
from uniloom.kernels.linear_ce import linear_cross_entropy
from uniloom.models.blocks import KVCache, RMSNorm, attention_mask, rope_angles, square_grid
from uniloom.models.flow_head import FlowHead
from uniloom.models.sequence import IGNORE, TASKS, Batch, align_image_starts, turn_ids
from uniloom.models.special_tokens import IMAGE_START, SPECIAL_IDS
from uniloom.models.transformer import DecoderBlock
from uniloom.models.unitok_head import CodeEmbedding, DepthHead
from uniloom.models.univision_config import UniVisionConfig

__all__ = ["DecoderOutput", "Losses", "UniVision", "UniVisionConfig"]


@dataclass
class DecoderOutput:
    hidden: torch.Tensor  # (B, T, H) after the final norm
    aux_loss: torch.Tensor  # () load-balancing loss, mean over layers
    expert_load: torch.Tensor  # (L, E) token-slots routed to each expert in each layer


@dataclass
class Losses:
    total: torch.Tensor
    text: torch.Tensor  # mean over assistant turns of their mean CE (0 when the batch has none)
    flow: torch.Tensor  # mean flow-matching MSE over generated latents or TUNA images (0 when none)
    code: torch.Tensor  # mean UniTok code CE over generated positions (0 when none)
    aux: torch.Tensor
    per_task: dict[str, float]  # "<task>/text", "<task>/flow" or "<task>/code" for the tasks present
    expert_load: torch.Tensor  # (L, E)


class UniVision(nn.Module):
    def __init__(self, cfg: UniVisionConfig):
        super().__init__()
        self.cfg = cfg
        mingtok = cfg.image_kind == "mingtok"
        # MingTok's modules are built in their original order among the backbone's, so a
        # seed gives the weights (and a checkpoint the names) it gave before the kinds.
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        if mingtok:
            self.projector = nn.Sequential(
                nn.Linear(cfg.semantic_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden)
            )
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps, kernels=cfg.kernels)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if mingtok:
            self.vis_head = nn.Sequential(
                nn.Linear(cfg.hidden, cfg.flow_width), nn.LayerNorm(cfg.flow_width, eps=1e-6)
            )
        self._init_backbone()
        if mingtok:
            # The flow head keeps MAR's initialisation (zeroed modulation and output).
            self.flow_head = FlowHead(
                cfg.latent_dim,
                cfg.flow_width,
                cfg.flow_width,
                cfg.flow_depth,
                cfg.flow_mlp_mult,
                kernels=cfg.kernels,
            )
            if cfg.coarse_codes:
                # The code's embedding starts at zero: the flow head starts as without codes.
                # The centres are set from training latents (set_coarse_centers) and saved.
                self.coarse_head = nn.Linear(cfg.hidden, cfg.coarse_codes, bias=False)
                nn.init.normal_(self.coarse_head.weight, std=cfg.init_std)
                self.coarse_embed = nn.Embedding(cfg.coarse_codes, cfg.flow_width)
                nn.init.zeros_(self.coarse_embed.weight)
                self.register_buffer("coarse_centers", torch.zeros(cfg.coarse_codes, cfg.latent_dim))
        elif cfg.image_kind == "unitok":
            self.code_embed = CodeEmbedding(cfg.num_codebooks, cfg.codebook_size, cfg.hidden, cfg.init_std)
            self.depth_head = DepthHead(cfg.hidden, cfg.num_codebooks, cfg.codebook_size, cfg.depth_width,
                                        cfg.depth_layers, cfg.depth_heads, cfg.init_std)  # fmt: skip
        # tuna: the cascade and its velocity head are the TUNA tokenizer's (models/tuna.py),
        # passed to `loss` and generation as MingTok's semantic decoder is.

    def _init_backbone(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ forward

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.num_layers)

    def image_positions(self, input_ids_BT, image_mask_BT=None):
        """(B, T) bool positions that read a row of image inputs (None: none), and for tuna
        (B, T) long image ids, -1 outside images (None for the causal kinds). TUNA's image
        is its <image_start> (which carries the time token) and the slots after it, in one
        call; an <image_start> with no slot after it is text (a generated token)."""
        if image_mask_BT is None or self.cfg.image_kind != "tuna":
            return image_mask_BT, None
        before_slot_BT = torch.zeros_like(image_mask_BT)
        before_slot_BT[:, :-1] = image_mask_BT[:, 1:]
        start_BT = (input_ids_BT == SPECIAL_IDS[IMAGE_START]) & before_slot_BT & ~image_mask_BT
        block_BT = start_BT | image_mask_BT
        image_ids_BT = start_BT.long().cumsum(1) - 1
        if (image_mask_BT & (image_ids_BT < 0)).any():
            raise ValueError("TUNA image slots must follow their <image_start> in the same call")
        return block_BT, torch.where(block_BT, image_ids_BT, -1)

    def embed_inputs(self, input_ids_BT, image_inputs=None, image_mask_BT=None):
        """Token embeddings with the image positions (row-major order) replaced, one row of
        image_inputs each:
            mingtok  (P, D) MingTok semantic features of the slots, through the projector
            unitok   (P, K) long codes of the slots, through the code embedding
            tuna     (I * (1 + N), H) each image's block (Tuna.image_tokens), in order"""
        x_BTH = self.embed(input_ids_BT)
        positions_BT, _ = self.image_positions(input_ids_BT, image_mask_BT)
        slots = 0 if positions_BT is None else int(positions_BT.sum())
        given = 0 if image_inputs is None else image_inputs.shape[0]
        if slots != given:
            raise ValueError(f"{slots} image positions but {given} image input rows")
        if slots:
            if self.cfg.image_kind == "mingtok":
                rows_PH = self.projector(image_inputs.to(x_BTH.dtype))
            elif self.cfg.image_kind == "unitok":
                rows_PH = self.code_embed(image_inputs)
            else:
                rows_PH = image_inputs
            # autocast computes the projector in bf16; the embeddings stay in their dtype
            x_BTH = x_BTH.masked_scatter(positions_BT[..., None], rows_PH.to(x_BTH.dtype))
        return x_BTH

    def forward(self, input_ids_BT, image_inputs=None, image_mask_BT=None, *, position_ids_BT=None,
                doc_ids_BT=None, key_mask_BT=None, cache: KVCache | None = None) -> DecoderOutput:  # fmt: skip
        """Hidden states of the new tokens; image_inputs as `embed_inputs` takes them.
        key_mask hides tokens from every later query (padding, guidance); without
        position_ids a token's position is the number of visible tokens before it in its
        row (cache included)."""
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
        if self.cfg.image_stride:
            carried = None if cache is None else cache.position_shift
            position_ids_BT, shift_B = align_image_starts(
                input_ids_BT, position_ids_BT, key_mask_BT, self.cfg.image_stride, carried
            )
            if cache is not None:
                cache.position_shift = shift_B
        all_keys_BS = cache.extend_mask(key_mask_BT) if cache is not None else key_mask_BT
        _, image_ids_BT = self.image_positions(input_ids_BT, image_mask_BT)
        mask = attention_mask(all_keys_BS, T, doc_ids_BT, image_ids_BT)
        x = self.embed_inputs(input_ids_BT, image_inputs, image_mask_BT)
        cos, sin = rope_angles(position_ids_BT, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        aux, load = [], []
        for i, layer in enumerate(self.layers):
            x, stats = layer(x, cos, sin, mask, image_mask_BT, cache, i, valid_BT)
            aux.append(stats.aux_loss)
            load.append(stats.tokens_per_expert)
        return DecoderOutput(self.norm(x), torch.stack(aux).mean(), torch.stack(load))

    def logits(self, hidden):  # (..., H) -> (..., V)
        return self.lm_head(hidden)

    def flow_condition(self, hidden, code=None):  # (..., H), coarse codes (...) -> (..., flow_width)
        cond = self.vis_head(hidden)
        return cond if code is None else cond + self.coarse_embed(code)

    def coarse_modules(self) -> list[nn.Module]:
        """The coarse codes' head and embedding (none without coarse codes)."""
        return [self.coarse_head, self.coarse_embed] if self.cfg.coarse_codes else []

    def set_coarse_centers(self, centers_KC: torch.Tensor) -> None:
        """The k-means centres (K, C) of training latents that define the coarse codes."""
        self.coarse_centers.copy_(centers_KC)

    def coarse_code(self, latents_NC):  # (N, C) -> (N,) the nearest centre of each latent
        return torch.cdist(latents_NC.float(), self.coarse_centers.float()).argmin(-1)

    # ------------------------------------------------------------------ training loss

    def shifted_targets(self, batch: Batch, hidden_BTH):
        """The generated slots' rows of batch.image_latents (N, C) and the hidden states
        (N, H) that predict them: slot j's from the hidden state at j - 1 (same document:
        a slot always follows <image_start> or another slot)."""
        target_BT = batch.image_targets
        cond_BT = torch.zeros_like(target_BT)
        cond_BT[:, :-1] = target_BT[:, 1:]
        return batch.image_latents[target_BT[batch.image_mask]], hidden_BTH[cond_BT]

    def flow_pairs(self, batch: Batch, hidden_BTH):
        """MingTok: the generated latents (N, C), the flow head's conditions (N, Z) (with
        coarse codes: given the true code) and the coarse codes' logits (N, K) or None."""
        x0_NC, h_NH = self.shifted_targets(batch, hidden_BTH)
        if not self.cfg.coarse_codes:
            return x0_NC, self.flow_condition(h_NH), None
        return x0_NC, self.flow_condition(h_NH, self.coarse_code(x0_NC)), self.coarse_head(h_NH)

    def loss(self, batch: Batch, image_features_PD=None, *, tuna=None, generator=None) -> Losses:
        """The training objective of a (packed) batch. mingtok: image_features_PD are the
        MingTok semantic features of batch.image_latents (MingTok.slot_features); unitok:
        batch.image_latents are the codes; tuna: `tuna` is the TUNA tokenizer (models/tuna.py)
        whose cascade reads batch.image_latents (latent tokens), noised with `generator`."""
        kind = self.cfg.image_kind
        if kind == "tuna":
            if tuna is None:
                raise ValueError("the loss of a tuna model needs the TUNA tokenizer (tuna=)")
            image_inputs, generated = self._tuna_inputs(batch, tuna, generator)
        else:
            image_inputs = image_features_PD if kind == "mingtok" else batch.image_latents
        out = self(batch.input_ids, image_inputs, batch.image_mask,
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
        per_task = _per_task(text_ce, batch.task_ids[text_sel], "text")

        flow = code = zero
        if kind == "mingtok":
            # Called with no targets too (N = 0): a flow head balanced across ranks
            # (pipelines/train/flow_balance.py) exchanges rows at every step, and with N = 0
            # the empty sum keeps it in the graph: the rows this rank ran for others get
            # their gradients, and its backward makes the same exchanges as the other ranks'.
            x0_NC, cond_NZ, logits_NK = self.flow_pairs(batch, h_BTH)
            flow_mse = self.flow_head.loss(x0_NC.to(h_BTH.dtype), cond_NZ, self.cfg.flow_batch_mul)  # (N,)
            flow = flow_mse.mean() if flow_mse.numel() else flow_mse.sum()
            image = self.cfg.flow_loss_weight * flow
            per_task |= _per_task(flow_mse, batch.task_ids[batch.image_targets], "flow")
            if logits_NK is not None:
                code_ce = F.cross_entropy(
                    logits_NK.float(), self.coarse_code(x0_NC), reduction="none"
                )  # (N,)
                code = code_ce.mean() if code_ce.numel() else code_ce.sum()
                image = image + self.cfg.code_loss_weight * code
                per_task |= _per_task(code_ce, batch.task_ids[batch.image_targets], "code")
        elif kind == "unitok":
            codes_NK, h_NH = self.shifted_targets(batch, h_BTH)
            code_ce = self.depth_head.loss(h_NH, codes_NK)  # (N,)
            code = code_ce.mean() if code_ce.numel() else zero
            image = self.cfg.code_loss_weight * code
            per_task |= _per_task(code_ce, batch.task_ids[batch.image_targets], "code")
        else:
            flow_mse, task_G = self._tuna_flow(batch, tuna, h_BTH, generated)  # (G,)
            flow = flow_mse.mean() if flow_mse.numel() else zero
            image = self.cfg.flow_loss_weight * flow
            per_task |= _per_task(flow_mse, task_G, "flow")
        total = self.cfg.text_loss_weight * text + image
        total = total + self.cfg.aux_loss_weight * out.aux_loss
        return Losses(total, text, flow, code, out.aux_loss, per_task, out.expert_load)

    # ------------------------------------------------------------------ TUNA

    def _tuna_inputs(self, batch: Batch, tuna, generator=None):
        """The image blocks (I * (1 + N), H) the backbone reads, generated images noised,
        and what the flow term needs of them: (generated (I,) bool, t (G,), velocity
        target tokens (G, N, X)) of the G generated images."""
        P, X = batch.image_latents.shape
        start_BT = self.image_positions(batch.input_ids, batch.image_mask)[0] & ~batch.image_mask
        n_img = int(start_BT.sum())
        if not n_img:
            return None, None
        image_of_T = start_BT.flatten().long().cumsum(0) - 1  # each position's image, row-major
        slots_I = torch.bincount(image_of_T[batch.image_mask.flatten()], minlength=n_img)
        N = P // n_img
        if (slots_I != N).any():
            raise ValueError(f"TUNA images of a batch must have equal slot counts, got {slots_I.tolist()}")
        side = square_grid(N) * tuna.cfg.rep_patch_size
        dtype = tuna.head_out.linear.weight.dtype
        latents = tuna.latents_from_tokens(batch.image_latents.view(n_img, N, X).to(dtype), (side, side))
        generated_I = batch.image_targets[batch.image_mask].view(n_img, N)[:, 0]
        t_G, x_t, target = tuna.flow_path(latents[generated_I], generator=generator)
        chosen = generated_I.nonzero()[:, 0]
        t_I = torch.ones(n_img, device=latents.device, dtype=dtype).index_put((chosen,), t_G)
        blocks = tuna.image_tokens(latents.index_put((chosen,), x_t), t_I)  # (I, 1 + N, H)
        return blocks.reshape(-1, blocks.shape[-1]), (generated_I, t_G, tuna.tokens_from_latents(target))

    def _tuna_flow(self, batch: Batch, tuna, hidden_BTH, generated):
        """Flow-matching MSE per generated image (G,) from its block's hidden states, and
        the images' task ids (G,)."""
        if generated is None:
            return hidden_BTH.new_zeros(0), batch.task_ids.new_zeros(0)
        generated_I, t_G, target_GNX = generated
        block_BT, _ = self.image_positions(batch.input_ids, batch.image_mask)
        n_img = generated_I.shape[0]
        h_GLH = hidden_BTH[block_BT].view(n_img, -1, hidden_BTH.shape[-1])[generated_I]  # L = 1 + N
        v_GNX = tuna.velocity(h_GLH, t_G)[:, 1:]  # the image tokens, past the time token
        start_BT = block_BT & ~batch.image_mask
        task_G = batch.task_ids[start_BT][generated_I]
        return (v_GNX.float() - target_GNX.float()).pow(2).mean(dim=(1, 2)), task_G

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

    def vision_modules(self) -> dict[str, nn.Module]:
        """The kind's own modules beside the backbone, by attribute name (none for tuna:
        its cascade and velocity head are the TUNA tokenizer's)."""
        coarse = ("coarse_head", "coarse_embed") if self.cfg.coarse_codes else ()
        names = {"mingtok": ("projector", "vis_head", "flow_head", *coarse), "unitok": ("code_embed", "depth_head"),
                 "tuna": ()}[self.cfg.image_kind]  # fmt: skip
        return {name: getattr(self, name) for name in names}

    def parameter_counts(self) -> dict[str, int]:
        """Totals and per-token active counts. The backbone (embeddings, blocks, final
        norm, LM head) is what Ling-lite's published 16.8B / 2.75B count; a token uses k of
        E routed experts and one of the two gates. Vision parts are reported apart."""
        cfg = self.cfg
        n = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        vision = sum(n(m) for m in self.vision_modules().values())
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
