"""The visual tokenizer kinds (`tokenizer.kind`) as every stage sees them: the one place
that says what each kind's model is and what its image tokens are; stages choose a kind
here and otherwise treat them alike.

    kind     config section  per image token                   stored as
    mingtok  mingtok:        its normalised latent (latent_dim)  floats (data.latent_dtype)
    unitok   unitok:         its K sub-codebook codes           integers (int16 or int32)
    tuna     tuna:           its VAE latent values (P_r^2 C)     floats (data.latent_dtype)

`values(model, images)` gives (B, N, X) rows in that layout, the rows the unified model's
image slots read (models/sequence.py); `decode(model, values)` renders them back.

The unified model's training (pipelines/train/module.py) asks the kind which of its
modules and the tokenizer's make up each part of the recipe (`parts`), what the model's
loss takes beside the batch (`loss_inputs`), and its per-token flow head if it has one
(`token_flow_head`: the flow head that train/flow_balance.py balances and that evaluation
samples teacher-forced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.models.tuna_config import TunaConfig
from uniloom.models.unitok_config import UniTokConfig


@dataclass(frozen=True)
class Kind:
    name: str
    config_cls: type
    # The state dict entries that `values` needs: the data stage loads only these.
    encoder_prefixes: tuple[str, ...]
    width_field: str  # the config field that gives X, the values per token

    @property
    def registered_name(self) -> str:
        return f"uniloom-{self.name}"

    @property
    def config_key(self) -> str:
        """The safetensors metadata key of an exported tokenizer's config."""
        return f"{self.name}_config"

    def config(self, cfg) -> Any:
        """The kind's architecture: the config section of its name."""
        return getattr(cfg, self.name)

    def model_class(self) -> type:
        raise NotImplementedError

    def build(self, tok_cfg):
        return self.model_class()(tok_cfg)

    def token_shape(self, tok_cfg) -> tuple[int, int]:
        """(N, X): tokens per image and values per token."""
        return tok_cfg.num_tokens, getattr(tok_cfg, self.width_field)

    def dtype(self, tok_cfg, float_dtype: str) -> str:
        """The stored dtype of the values (data.latent_dtype for the continuous kinds)."""
        return float_dtype

    def values(self, model, images):
        """images (B, 3, H, W) in [-1, 1] -> (B, N, X): latents (float) or codes (long)."""
        return model.encode(images)

    def decode(self, model, values):
        """(B, N, X) as `values` gives them -> images (B, 3, H, W) in [-1, 1]."""
        raise NotImplementedError

    def pooled(self, model, images):
        """(B, D) mean-pooled features of what the image tokens carry (linear probes)."""
        raise NotImplementedError

    def calibrate(self, model, images) -> tuple[float, float] | None:
        """Set the latent normalisation to the mean/std of the raw latents of images
        (B, 3, H, W) in [-1, 1]; returns (shift, scale), None for a kind without one."""
        return None

    # ------------------------------------------------------------------ in the unified model

    def parts(self, model, tokenizer) -> dict[str, list]:
        """The recipe's image parts (train/config.py PARTS but llm, which every kind shares)
        as this kind's modules of the unified model `model` and the tokenizer: "projector"
        what turns the shards' values into the backbone's input rows, "flow_head" what
        predicts the image, "semantic_decoder" the part of the tokenizer that joint
        training fine-tunes (empty: the tokenizer stays frozen in every stage)."""
        raise NotImplementedError

    def loss_inputs(self, tokenizer, batch) -> dict:
        """What UniVision.loss takes beside the batch for this kind."""
        return {}

    def token_flow_head(self, model):
        """The unified model's per-token flow head (MingTok's), or None."""
        return None


class MingTokKind(Kind):
    def model_class(self) -> type:
        from uniloom.models.mingtok import MingTok

        return MingTok

    def decode(self, model, values):
        return model.decode_pixels(model.decode_semantic(values, total=values.shape[1]))

    def pooled(self, model, images):  # the semantic features
        return model.decode_semantic(model.encode(images)).mean(1)

    def calibrate(self, model, images):
        from uniloom.pipelines.tokenizer.weights import calibrate_latents

        return calibrate_latents(model, images)

    def parts(self, model, tokenizer):
        return {
            "projector": [model.projector],
            "flow_head": [model.vis_head, model.flow_head, *model.coarse_modules()],
            "semantic_decoder": [tokenizer.semantic_decoder],
        }

    def loss_inputs(self, tokenizer, batch):
        """The semantic features (P, D) of the slots' latents; without a graph when the
        semantic decoder is frozen (the latents are data). None without slots."""
        import contextlib

        import torch

        latents_PC = batch.image_latents
        if latents_PC.shape[0] == 0:
            return {"image_features_PD": None}
        decoder = tokenizer.semantic_decoder
        frozen = not any(p.requires_grad for p in decoder.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            features = tokenizer.slot_features(latents_PC.to(decoder.proj.weight.dtype))
        return {"image_features_PD": features}

    def token_flow_head(self, model):
        return model.flow_head


class UniTokKind(Kind):
    def model_class(self) -> type:
        from uniloom.models.unitok import UniTok

        return UniTok

    def dtype(self, tok_cfg, float_dtype: str) -> str:
        """Codes as the narrowest integer that holds them."""
        return "int16" if tok_cfg.codebook_size <= 2**15 else "int32"

    def decode(self, model, values):
        return model.decode_codes(values.long())

    def pooled(self, model, images):  # the post-quantization tokens the contrastive term reads
        return model.post_quant_proj(model.quantizer.lookup(model.encode(images))).mean(1)

    def parts(self, model, tokenizer):
        # The codes are data: the codebooks and decoder stay as the tokenizer stage made
        # them, so a joint stage's semantic_decoder trains nothing of UniTok.
        return {"projector": [model.code_embed], "flow_head": [model.depth_head], "semantic_decoder": []}


class TunaKind(Kind):
    def model_class(self) -> type:
        from uniloom.models.tuna import Tuna

        return Tuna

    def values(self, model, images):  # the posterior mean's tokens
        return model.tokens_from_latents(model.encode(images))

    def decode(self, model, values):
        from uniloom.models.blocks import square_grid

        side = square_grid(values.shape[1]) * model.cfg.rep_patch_size
        return model.decode(model.latents_from_tokens(values, (side, side)))

    def pooled(self, model, images):  # the VAE latents (the cascade trains in the unified model)
        return self.values(model, images).mean(1)

    def parts(self, model, tokenizer):
        # The cascade and velocity head are the tokenizer's modules and train here; the
        # VAE stays frozen (the flow's targets live in its latent space), so a joint
        # stage's semantic_decoder trains nothing of TUNA. The time embedding serves both
        # the image block's time token and the velocity head.
        t = tokenizer
        return {
            "projector": [t.rep_encoder, t.connector, t.time_embed],
            "flow_head": [t.time_embed, t.head, t.head_out],
            "semantic_decoder": [],
        }

    def loss_inputs(self, tokenizer, batch):
        return {"tuna": tokenizer}

    def calibrate(self, model, images):
        """The flow runs on (raw - shift) / scale (TunaConfig): from the posterior means."""
        import torch

        model.eval()
        with torch.no_grad():
            images = images.to(model.head_out.linear.weight.device)
            raw = torch.cat([model.posterior(images[i : i + 64])[0] for i in range(0, len(images), 64)])
        model.cfg.latent_shift, model.cfg.latent_scale = raw.mean().item(), max(raw.std().item(), 1e-6)
        return model.cfg.latent_shift, model.cfg.latent_scale


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        MingTokKind("mingtok", MingTokConfig, ("encoder.", "latent_shift", "latent_scale"), "latent_dim"),
        UniTokKind("unitok", UniTokConfig, ("encoder.", "quant_proj.", "quantizer."), "num_codebooks"),
        TunaKind("tuna", TunaConfig, ("vae_encoder.", "vae_moments."), "velocity_dim"),
    )
}


def kind_of(cfg) -> Kind:
    """The kind `cfg.tokenizer.kind` chooses."""
    return KINDS[cfg.tokenizer.kind]


def kind_in(metadata: dict[str, str]) -> Kind | None:
    """The kind of an exported tokenizer file, from the config key in its metadata."""
    return next((k for k in KINDS.values() if k.config_key in metadata), None)


def kind_for_config(tok_cfg) -> Kind:
    """The kind of a tokenizer config, from its type."""
    return next(k for k in KINDS.values() if isinstance(tok_cfg, k.config_cls))


def kind_for(model) -> Kind:
    """The kind of a tokenizer model."""
    return kind_for_config(model.cfg)
