"""Contrastive alignment of pooled image features with locked caption embeddings: the
text term of MingTok's objective (models/mingtok_loss.py) and of UniTok's
(models/unitok_loss.py).

Every caption of the corpus is a class: the image's own caption is the positive, all
others are negatives, near misses like "a red square" for "a red circle" included, which a
batch alone rarely holds. The caption embeddings are locked (pipelines/tokenizer/text.py).

Shape legend: B images, E embedding width, U captions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INITIAL_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature


def caption_contrastive(image_BE, text_table_UE, caption_B, logit_scale) -> torch.Tensor:
    """Cross-entropy of each image against every caption: image_BE the projected image
    features, text_table_UE the caption embeddings, caption_B each image's row in the
    table, logit_scale () the learned log inverse temperature (capped at log 100)."""
    image_BE = F.normalize(image_BE, dim=-1)
    logits_BU = logit_scale.clamp(max=math.log(100)).exp() * image_BE @ F.normalize(text_table_UE, dim=-1).T
    return F.cross_entropy(logits_BU, caption_B)
