"""Generation with the unified model: images (with three-way classifier-free guidance),
multi-round editing that carries the key/value cache across turns, and text answers, for
each visual tokenizer kind (model.cfg.image_kind; `tokenizer` is the matching MingTok,
UniTok or Tuna).

Image loop of the autoregressive kinds, per image token (N of them, the tokenizer's grid):
    mingtok  hidden -> vis_head -> flow head (Euler, shared noise across branches) -> latent
             (with model.coarse_codes: first a coarse code from its guided softmax head,
             drawn once for all branches, whose embedding joins the flow head's condition)
             latent -> MingTok semantic decoder, incrementally (its own KV cache) -> feature
             feature -> projector -> the next input embedding
    unitok   hidden -> depth head, one sub-codebook at a time (guided logits, each code
             drawn once for all branches) -> K codes -> code embedding -> the next input
Pixels are rendered once, at the end (MingTok from the features, UniTok from the codes);
a later edit turn continues from the cache, so nothing is decoded and re-encoded between.

TUNA denoises the whole image at once: Euler steps t = 0 -> 1 of the VAE latent x, each
step running [<image_start>, N slots] = the cascade's block of x at t through the backbone
on a fork of the prompt's cache (the look-ahead is not kept), the velocity head reading
the block's hidden states. The clean latent's block (t = 1), <image_end> and <eos> then
join the conversation, so a later turn reads the image as understanding does.

Guidance runs the branches as rows of one batch (branch-major: row g * B + b), each with
its own key mask over the same tokens:
    g = 0 unconditional       the last human turn hidden (and, with drop_history, all history)
    g = 1 text-unconditional  only the text of the last human turn hidden
    g = 2 conditional         everything visible
combined as v = v_u + s_t (v_tu - v_u) + s_c (v_c - v_tu) on velocities (mingtok in its
flow head, tuna here) or on code logits (unitok). Positions count visible tokens only, so
a branch computes exactly what the model computes on the sequence with its hidden tokens
removed: the sequences `drop` trains (models/sequence.py). History is the conditional
branch's: after an image the cache keeps only its rows, and the next turn fans them out.

Shape legend: B prompts, G guidance branches (3, or 1 without guidance), T prompt length,
N image tokens, C latent channels, D semantic width, K UniTok codes per token, H hidden.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from uniloom.models import sequence
from uniloom.models.blocks import KVCache
from uniloom.models.mingtok_config import MingTokConfig
from uniloom.models.special_tokens import EOS, IMAGE_END, IMAGE_PATCH, IMAGE_START, PAD, SPECIAL_IDS
from uniloom.models.tuna_config import TunaConfig
from uniloom.models.unitok_config import UniTokConfig
from uniloom.models.univision import UniVision

TOKENIZER_CONFIGS = {"mingtok": MingTokConfig, "unitok": UniTokConfig, "tuna": TunaConfig}


@dataclass
class ImageTurn:
    # The image in the kind's own terms: MingTok latents (B, N, C), UniTok codes (B, N, K)
    # long, TUNA normalised VAE latents (B, C, h, w).
    latents: torch.Tensor
    features: torch.Tensor | None  # (B, N, D) MingTok semantic features; None for the other kinds
    images: torch.Tensor | None  # (B, 3, H, W) in [-1, 1], None when not rendered
    state: KVCache  # the conversation so far (conditional rows), for the next turn


@dataclass
class TextTurn:
    ids: list[list[int]]  # generated ids per prompt, up to and including <eos>
    state: KVCache


def _left_pad(prompts: list[sequence.Prompt]):
    """Stack prompts to (B, T), padding on the left; returns the stacked fields and valid."""
    T = max(p.input_ids.shape[0] for p in prompts)

    def stack(name, fill):
        rows = []
        for p in prompts:
            x = getattr(p, name)
            rows.append(torch.cat([torch.full((T - x.shape[0],), fill, dtype=x.dtype), x]))
        return torch.stack(rows)

    valid = torch.stack([torch.arange(T) >= T - p.input_ids.shape[0] for p in prompts])
    return stack("input_ids", SPECIAL_IDS[PAD]), stack("image_mask", False), stack("text_mask", False), \
        stack("turn_mask", False), valid  # fmt: skip


def prefill(model: UniVision, prompts: list[sequence.Prompt], state: KVCache | None = None,
            source_features=None, guidance: bool = True, drop_history: bool = False):  # fmt: skip
    """Run the prompts (after `state`) through the model in G branches; returns the last
    hidden state (G * B, H) and the branch-major cache. source_features (B, n, ...): each
    prompt's image input rows (`source_inputs`)."""
    device = next(model.parameters()).device
    ids, image_mask, text_mask, turn_mask, valid = (t.to(device) for t in _left_pad(prompts))
    B = ids.shape[0]
    branches = [valid & ~turn_mask, valid & ~text_mask, valid] if guidance else [valid]
    G = len(branches)
    cache = state.repeat(G) if state is not None else model.new_cache()
    if drop_history and guidance and state is not None:
        cache.key_mask[:B] = False  # the unconditional rows forget the conversation so far
    features = None
    if source_features is not None:
        features = source_features.repeat(G, 1, 1).reshape(-1, source_features.shape[-1])  # (G * B * n, D)
    out = model(
        ids.repeat(G, 1), features, image_mask.repeat(G, 1), key_mask_BT=torch.cat(branches), cache=cache
    )
    return out.hidden[:, -1], cache


def check_tokenizer(mcfg, cfg) -> None:
    """Raise ValueError unless a model of config `mcfg` reads and writes the tokens of a
    tokenizer of config `cfg` (its kind, and the widths the two share)."""
    kind = mcfg.image_kind
    if not isinstance(cfg, TOKENIZER_CONFIGS[kind]):
        raise ValueError(
            f"a {kind} model needs a {kind} tokenizer, got {type(cfg).__name__.removesuffix('Config')}"
        )
    if kind == "mingtok" and (cfg.semantic_dim != mcfg.semantic_dim or cfg.latent_dim != mcfg.latent_dim):
        raise ValueError(
            f"MingTok (semantic {cfg.semantic_dim}, latent {cfg.latent_dim}) does not match "
            f"the model (semantic {mcfg.semantic_dim}, latent {mcfg.latent_dim})"
        )
    if kind == "unitok" and (
        cfg.num_codebooks != mcfg.num_codebooks or cfg.codebook_size != mcfg.codebook_size
    ):
        raise ValueError(
            f"UniTok ({cfg.num_codebooks} x {cfg.codebook_size} codes) does not match the model "
            f"({mcfg.num_codebooks} x {mcfg.codebook_size})"
        )
    if kind == "tuna" and cfg.llm_width != mcfg.hidden:
        raise ValueError(f"TUNA (llm_width {cfg.llm_width}) does not match the model (hidden {mcfg.hidden})")


def source_inputs(model: UniVision, tokenizer, images):
    """Images (B, 3, H, W) in [-1, 1] -> the model's input rows for each (B, n_rows, ...)
    and the slots each image takes: MingTok semantic features (B, N, D), UniTok codes
    (B, N, K), or TUNA's clean block (B, 1 + N, H) at t = 1. (None, 0) without images."""
    if images is None:
        return None, 0
    kind = model.cfg.image_kind
    if kind == "mingtok":
        latents = tokenizer.encode(images)  # (B, n, C)
        return tokenizer.decode_semantic(latents), latents.shape[1]
    if kind == "unitok":
        codes = tokenizer.encode(images)  # (B, n, K)
        return codes, codes.shape[1]
    z = tokenizer.encode(images)  # (B, C, h, w)
    block = tokenizer.image_tokens(z, torch.ones(z.shape[0], device=z.device, dtype=z.dtype))
    return block, block.shape[1] - 1


def guide(values_G, scales: tuple[float, float] | None):
    """Branch outputs (G, ...) -> the guided output: v_u + s_t (v_tu - v_u) + s_c (v_c - v_tu),
    or the single branch's without guidance."""
    if scales is None:
        return values_G[0]
    s_t, s_c = scales
    return values_G[0] + s_t * (values_G[1] - values_G[0]) + s_c * (values_G[2] - values_G[1])


@torch.no_grad()
def generate(model: UniVision, tokenizer, prompt_ids: Sequence[Sequence[int]], *, source_images=None,
             state: KVCache | None = None, steps: int | None = None, temperature: float | None = None,
             coarse_temperature: float | None = None, guidance: bool = True, scales: tuple[float, float] | None = None, drop_history: bool = False,
             render: bool = True, generator: torch.Generator | None = None) -> ImageTurn:  # fmt: skip
    """One human turn (text ids, optionally with source images (B, 3, H, W) in [-1, 1])
    answered with an image, continuing the conversation in `state` if given. steps: flow
    steps (mingtok, tuna); temperature: the noise scale of the flow's start (mingtok,
    tuna) or the codes' softmax temperature, 0 = greedy (unitok); coarse_temperature: the
    coarse code's softmax temperature, 0 = greedy (mingtok with coarse codes)."""
    cfg = model.cfg
    check_tokenizer(model.cfg, tokenizer.cfg)
    if not prompt_ids or (state is not None and state.key_mask.shape[0] != len(prompt_ids)):
        raise ValueError("prompt_ids must hold one prompt per row of the conversation state")
    steps = steps or cfg.flow_steps
    temperature = cfg.temperature if temperature is None else temperature
    coarse_temperature = cfg.coarse_temperature if coarse_temperature is None else coarse_temperature
    scales = (scales or (cfg.cfg_text_uncond_scale, cfg.cfg_cond_scale)) if guidance else None
    sources, n_src = source_inputs(model, tokenizer, source_images)
    tuna = cfg.image_kind == "tuna"  # its prompt stops before <image_start>: the block brings it
    prompts = [sequence.prompt(ids, n_src, image=not tuna) for ids in prompt_ids]
    h, cache = prefill(model, prompts, state, sources, guidance, drop_history)
    if tuna:
        return _tuna_image(
            model, tokenizer, cache, len(prompts), steps, temperature, scales, render, generator
        )

    B, G, N = len(prompts), (3 if guidance else 1), tokenizer.cfg.num_tokens
    if cfg.image_kind == "mingtok":
        sem_cache = tokenizer.new_semantic_cache(B)

        def draw(h_RH):  # -> (latent (B, C), its input row: the semantic feature (B, D))
            code = (
                _sample_coarse(model, h_RH, scales, coarse_temperature, generator)
                if cfg.coarse_codes
                else None
            )
            z_BC = model.flow_head.sample(
                model.flow_condition(h_RH, code), steps, temperature, scales, generator
            )
            return z_BC, tokenizer.decode_semantic(z_BC[:, None], cache=sem_cache)[:, 0]
    else:

        def draw(h_RH):  # -> (codes (B, K), the same codes as the input row)
            codes_BK = _sample_codes(model.depth_head, h_RH, temperature, scales, generator)
            return codes_BK, codes_BK

    device = h.device
    patch_ids = torch.full((G * B, 1), SPECIAL_IDS[IMAGE_PATCH], device=device)
    patch_mask = torch.ones(G * B, 1, dtype=torch.bool, device=device)
    values, inputs = [], []
    for i in range(N):
        value, row = draw(h)
        values.append(value)
        inputs.append(row)
        if i < N - 1:
            h = model(patch_ids, row.repeat(G, 1), patch_mask, cache=cache).hidden[:, -1]

    # Close the turn on the conditional rows only: last slot, <image_end>, <eos>.
    cache = cache.select(slice((G - 1) * B, G * B))
    closing = torch.tensor(
        [SPECIAL_IDS[IMAGE_PATCH], SPECIAL_IDS[IMAGE_END], SPECIAL_IDS[EOS]], device=device
    )
    closing_mask = torch.tensor([True, False, False], device=device)
    model(closing.repeat(B, 1), inputs[-1], closing_mask.repeat(B, 1), cache=cache)
    values_BN = torch.stack(values, 1)
    if cfg.image_kind == "mingtok":
        images = tokenizer.decode_pixels(torch.stack(inputs, 1)) if render else None
        return ImageTurn(values_BN, torch.stack(inputs, 1), images, cache)
    return ImageTurn(values_BN, None, tokenizer.decode_codes(values_BN) if render else None, cache)


def _sample_coarse(model: UniVision, h_RH, scales, temperature: float, generator):
    """MingTok's coarse code of the next latent, guided across the G branches and drawn
    once for all of them at `temperature` (0: the likeliest): (G * B,)."""
    G = 1 if scales is None else 3
    logits_BK = guide(model.coarse_head(h_RH).float().view(G, -1, model.cfg.coarse_codes), scales)
    return draw_code(logits_BK, temperature, generator).repeat(G)


def draw_code(logits_BK, temperature: float, generator=None):
    """One code per row of logits (B, K) at `temperature` (0: the likeliest): (B,)."""
    if temperature == 0:
        return logits_BK.argmax(-1)
    return torch.multinomial((logits_BK.float() / temperature).softmax(-1), 1, generator=generator)[:, 0]


def _sample_codes(head, h_RH, temperature: float, scales, generator):
    """A position's K codes (B, K) from the hidden states of its G branches (G * B, H):
    each sub-codebook's logits guided across the branches, the code drawn once and fed
    to every branch's next depth."""
    G = 1 if scales is None else 3
    cache = head.new_cache()
    logits = head.first(h_RH, cache)  # (G * B, V)
    codes = []
    for k in range(head.K):
        logits_BV = guide(logits.float().view(G, -1, logits.shape[-1]), scales)
        if temperature > 0:
            code_B = torch.multinomial((logits_BV / temperature).softmax(-1), 1, generator=generator)[:, 0]
        else:
            code_B = logits_BV.argmax(-1)
        codes.append(code_B)
        if k < head.K - 1:
            logits = head.next(code_B.repeat(G), k + 1, cache)
    return torch.stack(codes, 1)


def _tuna_image(model: UniVision, tuna, cache: KVCache, B: int, steps: int, temperature: float, scales,
                render: bool, generator) -> ImageTurn:  # fmt: skip
    """TUNA's turn after the prompt's cache: Euler t = 0 -> 1 of the whole latent, then
    the clean image, <image_end> and <eos> into the conditional rows."""
    G = 1 if scales is None else 3
    C, side, n = tuna.cfg.latent_channels, tuna.cfg.latent_grid, tuna.cfg.num_tokens
    ref = tuna.head_out.linear.weight  # the cascade's device and dtype
    device = ref.device
    ids = torch.tensor([SPECIAL_IDS[IMAGE_START]] + [SPECIAL_IDS[IMAGE_PATCH]] * n, device=device)
    slots = ids == SPECIAL_IDS[IMAGE_PATCH]
    x = temperature * torch.randn(B, C, side, side, generator=generator, device=device, dtype=ref.dtype)
    times = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=ref.dtype)
    for t, t_next in zip(times[:-1], times[1:]):
        block_BLH = tuna.image_tokens(x, t.expand(B))  # (B, 1 + n, H): the branches share x
        rows = block_BLH.repeat(G, 1, 1).flatten(0, 1)
        hidden = model(ids.repeat(G * B, 1), rows, slots.repeat(G * B, 1), cache=cache.fork()).hidden
        v_RNX = tuna.velocity(hidden, t.expand(G * B))[:, 1:]  # the image tokens, past the time token
        v = tuna.latents_from_tokens(v_RNX, (side, side)).view(G, B, C, side, side)
        x = x + (t_next - t) * guide(v, scales)

    cache = cache.select(slice((G - 1) * B, G * B))
    block_BLH = tuna.image_tokens(x, torch.ones(B, device=device, dtype=ref.dtype))
    closing = torch.tensor([SPECIAL_IDS[IMAGE_END], SPECIAL_IDS[EOS]], device=device)
    model(torch.cat([ids, closing]).repeat(B, 1), block_BLH.flatten(0, 1),
          torch.cat([slots, torch.zeros(2, dtype=torch.bool, device=device)]).repeat(B, 1), cache=cache)  # fmt: skip
    return ImageTurn(x, None, tuna.decode(x) if render else None, cache)


def edit(model: UniVision, tokenizer, state: KVCache | None, instruction_ids: Sequence[Sequence[int]], *,
         source_images=None, **kwargs) -> ImageTurn:  # fmt: skip
    """One editing round. The first round brings the source images (encoded once); later
    rounds edit the previous round's output straight from the cache (state)."""
    if state is None and source_images is None:
        raise ValueError("the first edit round needs source images")
    return generate(model, tokenizer, instruction_ids, source_images=source_images, state=state, **kwargs)


@torch.no_grad()
def generate_text(model: UniVision, prompt_ids: Sequence[Sequence[int]], *, tokenizer=None, images=None,
                  state: KVCache | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                  generator: torch.Generator | None = None, all_done=None) -> TextTurn:  # fmt: skip
    """Answer a human turn (optionally about images) with text: greedy at temperature 0.
    `all_done(done_B) -> bool` decides when decoding stops (default: every row has its
    <eos>); processes that run the model in lock step (sharded experts) pass one that
    agrees across them, so none stops while another still calls the model."""
    if images is not None:
        if tokenizer is None:
            raise ValueError(f"images need the {model.cfg.image_kind} tokenizer")
        check_tokenizer(model.cfg, tokenizer.cfg)
    sources, n_src = source_inputs(model, tokenizer, images)
    prompts = [sequence.prompt(ids, n_src, image=False) for ids in prompt_ids]
    h, cache = prefill(model, prompts, state, sources, guidance=False)
    B = len(prompts)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=h.device)
    for _ in range(max_new_tokens):
        logits = model.logits(h).float()  # (B, V)
        if temperature > 0:
            token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)[:, 0]
        else:
            token = logits.argmax(-1)
        live = ~done
        token = torch.where(live, token, SPECIAL_IDS[PAD])
        for b in live.nonzero()[:, 0].tolist():
            out[b].append(int(token[b]))
        h = model(token[:, None], key_mask_BT=live[:, None], cache=cache).hidden[:, -1]
        done = done | (token == SPECIAL_IDS[EOS])
        if all_done(done) if all_done is not None else bool(done.all()):
            break
    return TextTurn(out, cache)
