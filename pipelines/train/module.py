"""What training updates: the unified model plus the image tokenizer of its kind
(tokenizer.kind; pipelines/tokenizer/kinds.py says what each kind contributes). MingTok's
semantic decoder turns the shards' stored latents into the features the model reads
(and stage 2 fine-tunes it); UniTok's codes are read as they are; TUNA's cascade and
velocity head, which are the tokenizer's modules, train with the model.

What the tokenizer does not train rides along frozen: the export carries one consistent
tokenizer, and its decoder renders the sample images at evaluation.

A stage that trains the semantic decoder with the language-model losses alone would let
its features drift wherever those losses pull, and the frozen pixel decoder, trained on
the tokenizer stage's features, would stop rendering them. `anchor` ties it to the
tokenizer stage's semantic decoder: the MSE between its features and that frozen
reference's, on the same latents, is added to the loss (and logged as `loss_anchor`).
In a unit test (tests/pipelines/test_train_anchor.py) 15 steps at a high rate cost the
exported tokenizer 2.5 dB of PSNR without it and 0.25 dB with it (weight 1).

`input_noise` (train.input_noise) noises what the model reads of the images it learns to
draw: each generated image's latents get Gaussian noise of a std drawn per image from
U(0, input_noise) before the semantic decoder, while the flow targets stay clean (MingTok
only: UniTok's codes are discrete, TUNA noises its own latents). A model trained on clean
prefixes copies what it has drawn so far and never learns to draw an object's first,
barely covered patch from the caption; generation then fixes the colour at random.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from uniloom.models.generation import check_tokenizer
from uniloom.models.sequence import Batch
from uniloom.models.univision import Losses, UniVision, UniVisionConfig
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.tokenizer.kinds import kind_for_config


@dataclass
class TraineeLosses(Losses):
    anchor: torch.Tensor  # () feature MSE of the semantic decoder to its reference (0: not anchored)


class Trainee(nn.Module):
    def __init__(self, model_cfg: UniVisionConfig, tokenizer_cfg):
        """`tokenizer_cfg`: the config of a tokenizer of model_cfg.image_kind's kind."""
        super().__init__()
        try:
            check_tokenizer(model_cfg, tokenizer_cfg)
        except ValueError as e:
            raise UniloomError(str(e)) from None
        self.kind = kind_for_config(tokenizer_cfg)
        self.model = UniVision(model_cfg)
        self.tokenizer = self.kind.build(tokenizer_cfg)
        self.tokens_per_image = tokenizer_cfg.num_tokens
        self.anchor_weight = 0.0
        self.input_noise = 0.0  # train.input_noise: see the module's docstring
        # Plain tensors, not parameters or buffers: the reference is never trained, saved
        # or exported (it is the tokenizer stage's, which the run can always read again).
        self.reference: dict[str, torch.Tensor] = {}

    def parts(self) -> dict[str, list[nn.Module]]:
        """The recipe's vocabulary of trainable parts (train/config.py PARTS)."""
        m = self.model
        return {"llm": [m.embed, m.layers, m.norm, m.lm_head], **self.kind.parts(m, self.tokenizer)}

    def set_trainable(self, names: list[str]) -> None:
        self.requires_grad_(False)
        parts = self.parts()
        for name in names:
            for module in parts[name]:
                module.requires_grad_(True)

    def anchor(self, mingtok_state: dict[str, torch.Tensor], weight: float) -> None:
        """Anchor the semantic decoder to the one in `mingtok_state` (the tokenizer stage's
        MingTok weights) with this loss weight; 0 removes the anchor, as does a kind
        whose tokenizer has no semantic decoder to train."""
        prefix = "semantic_decoder."
        weight = weight if self.parts()["semantic_decoder"] else 0.0
        self.anchor_weight = weight
        self.reference = (
            {k[len(prefix) :]: v.detach().clone() for k, v in mingtok_state.items() if k.startswith(prefix)}
            if weight
            else {}
        )

    def reference_features(self, latents_PC):
        """The reference semantic decoder's features (P, D) of the same slots."""
        decoder = self.tokenizer.semantic_decoder
        weight = decoder.proj.weight
        if next(iter(self.reference.values())).device != weight.device:
            self.reference = {k: v.to(weight.device) for k, v in self.reference.items()}
        P, C = latents_PC.shape
        z = self.tokenizer.denormalize(latents_PC.to(weight.dtype).view(-1, self.tokens_per_image, C))
        with torch.no_grad():
            return torch.func.functional_call(decoder, self.reference, (z,)).reshape(P, -1)

    def noised(self, batch: Batch) -> Batch:
        """`batch` as the model reads it in training: with input_noise, the latents of its
        generated images (P, C) plus noise of a std drawn per image from U(0, input_noise);
        `batch` itself where there is nothing to noise."""
        latents_PC = batch.image_latents
        if not (self.training and self.input_noise) or not latents_PC.is_floating_point():
            return batch
        N = self.tokens_per_image
        generated_P = batch.image_targets[batch.image_mask]  # (P,)
        sigma_I = torch.rand(latents_PC.shape[0] // N, device=latents_PC.device) * self.input_noise
        sigma_P = sigma_I.repeat_interleave(N) * generated_P
        noise_PC = sigma_P[:, None].to(latents_PC.dtype) * torch.randn_like(latents_PC)
        return replace(batch, image_latents=latents_PC + noise_PC)

    def forward(self, batch: Batch) -> TraineeLosses:
        read = self.noised(batch)
        inputs = self.kind.loss_inputs(self.tokenizer, read)
        losses = self.model.loss(batch, **inputs)
        features = inputs.get("image_features_PD")
        if not (self.anchor_weight and features is not None and features.requires_grad):
            return TraineeLosses(**vars(losses), anchor=torch.zeros((), device=losses.total.device))
        anchor = F.mse_loss(features, self.reference_features(read.image_latents))
        total = losses.total + self.anchor_weight * anchor
        return TraineeLosses(**{**vars(losses), "total": total}, anchor=anchor.detach())


def compile_dense(trainee: Trainee) -> list[str]:
    """train.compile: torch.compile, in place (nn.Module.compile: the state dict keeps its
    names, so checkpoints and exports do not change), the parts whose shapes are fixed by
    the packed batch: each decoder layer's attention (projections, RoPE, attention) and
    each block of the per-token flow head, as torchtitan compiles per block. The MoE's
    routing and dispatch stay eager: their shapes follow the routing, and with expert
    parallelism they hold the all-to-alls. Returns the compiled modules' names."""
    names = []
    for i, layer in enumerate(trainee.model.layers):
        layer.attn.compile()
        names.append(f"model.layers.{i}.attn")
    head = trainee.kind.token_flow_head(trainee.model)
    for i, block in enumerate(head.blocks if head is not None else []):
        block.compile()
        names.append(f"model.flow_head.blocks.{i}")
    return names
