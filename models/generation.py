"""Generation with the unified model: images (with three-way classifier-free guidance),
multi-round editing that carries the key/value cache across turns, and text answers.

Image loop, per image token (N of them, MingTok's grid):
    hidden -> vis_head -> flow head (Euler, shared noise across branches) -> latent
    latent -> MingTok semantic decoder, incrementally (its own KV cache) -> feature
    feature -> projector -> the next input embedding
Pixels are rendered once, at the end, from the features; a later edit turn continues from
the cache, so features flow to features and nothing is decoded and re-encoded in between.

Guidance runs the branches as rows of one batch (branch-major: row g * B + b), each with
its own key mask over the same tokens:
    g = 0 unconditional       the last human turn hidden (and, with drop_history, all history)
    g = 1 text-unconditional  only the text of the last human turn hidden
    g = 2 conditional         everything visible
Positions count visible tokens only, so a branch computes exactly what the model computes
on the sequence with its hidden tokens removed: the sequences `drop` trains
(models/sequence.py). History is the conditional branch's: after an image the cache keeps
only its rows, and the next turn fans them out again.

Shape legend: B prompts, G guidance branches (3, or 1 without guidance), T prompt length,
N image tokens, C latent channels, D semantic width, H hidden.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from uniloom.models import sequence
from uniloom.models.blocks import KVCache
from uniloom.models.special_tokens import EOS, IMAGE_END, IMAGE_PATCH, PAD, SPECIAL_IDS
from uniloom.models.univision import UniVision


@dataclass
class ImageTurn:
    latents: torch.Tensor  # (B, N, C)
    features: torch.Tensor  # (B, N, D)
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
    hidden state (G * B, H) and the branch-major cache."""
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


def _check(model: UniVision, tokenizer) -> None:
    if (
        tokenizer.cfg.semantic_dim != model.cfg.semantic_dim
        or tokenizer.cfg.latent_dim != model.cfg.latent_dim
    ):
        raise ValueError(
            f"MingTok (semantic {tokenizer.cfg.semantic_dim}, latent {tokenizer.cfg.latent_dim}) does not match "
            f"the model (semantic {model.cfg.semantic_dim}, latent {model.cfg.latent_dim})"
        )


def _encode_sources(tokenizer, source_images):
    if source_images is None:
        return None, 0
    latents = tokenizer.encode(source_images)  # (B, n, C)
    return tokenizer.decode_semantic(latents), latents.shape[1]


@torch.no_grad()
def generate(model: UniVision, tokenizer, prompt_ids: Sequence[Sequence[int]], *, source_images=None,
             state: KVCache | None = None, steps: int | None = None, temperature: float | None = None,
             guidance: bool = True, scales: tuple[float, float] | None = None, drop_history: bool = False,
             render: bool = True, generator: torch.Generator | None = None) -> ImageTurn:  # fmt: skip
    """One human turn (text ids, optionally with source images (B, 3, H, W) in [-1, 1])
    answered with an image, continuing the conversation in `state` if given."""
    cfg = model.cfg
    _check(model, tokenizer)
    if not prompt_ids or (state is not None and state.key_mask.shape[0] != len(prompt_ids)):
        raise ValueError("prompt_ids must hold one prompt per row of the conversation state")
    steps = steps or cfg.flow_steps
    temperature = cfg.temperature if temperature is None else temperature
    scales = scales or (cfg.cfg_text_uncond_scale, cfg.cfg_cond_scale)
    source_features, n_src = _encode_sources(tokenizer, source_images)
    prompts = [sequence.prompt(ids, n_src, image=True) for ids in prompt_ids]
    h, cache = prefill(model, prompts, state, source_features, guidance, drop_history)

    B, G, N = len(prompts), (3 if guidance else 1), tokenizer.cfg.num_tokens
    device = h.device
    patch_ids = torch.full((G * B, 1), SPECIAL_IDS[IMAGE_PATCH], device=device)
    patch_mask = torch.ones(G * B, 1, dtype=torch.bool, device=device)
    sem_cache = tokenizer.new_semantic_cache(B)
    latents, features = [], []
    for i in range(N):
        z_BC = model.flow_head.sample(model.flow_condition(h), steps, temperature,
                                      scales if guidance else None, generator)  # fmt: skip
        f_BD = tokenizer.decode_semantic(z_BC[:, None], cache=sem_cache)[:, 0]
        latents.append(z_BC)
        features.append(f_BD)
        if i < N - 1:
            h = model(patch_ids, f_BD.repeat(G, 1), patch_mask, cache=cache).hidden[:, -1]

    # Close the turn on the conditional rows only: last slot, <image_end>, <eos>.
    cache = cache.select(slice((G - 1) * B, G * B))
    closing = torch.tensor(
        [SPECIAL_IDS[IMAGE_PATCH], SPECIAL_IDS[IMAGE_END], SPECIAL_IDS[EOS]], device=device
    )
    closing_mask = torch.tensor([True, False, False], device=device)
    model(closing.repeat(B, 1), features[-1], closing_mask.repeat(B, 1), cache=cache)
    features_BND = torch.stack(features, 1)
    images = tokenizer.decode_pixels(features_BND) if render else None
    return ImageTurn(torch.stack(latents, 1), features_BND, images, cache)


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
            raise ValueError("images need the MingTok tokenizer")
        _check(model, tokenizer)
    source_features, n_src = _encode_sources(tokenizer, images)
    prompts = [sequence.prompt(ids, n_src, image=False) for ids in prompt_ids]
    h, cache = prefill(model, prompts, state, source_features, guidance=False)
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
