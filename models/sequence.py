"""The unified sequence format and its builders for the four task kinds, plus packing.

One conversation turn each, or several (ids from the pipeline's BPE; specials from
special_tokens):

    understanding  <human> <image_start> [slot]*N <image_end> question <assistant> answer <eos>
                   ( <human> question <assistant> answer <eos> )*    (multi-turn VQA)
    text-to-image  <human> caption <assistant> <image_start> [slot]*N <image_end> <eos>
    text-only      text <eos>        or   <human> prompt <assistant> response <eos>
    editing        <human> <image_start> [src]*N <image_end> instruction <assistant>
                   <image_start> [tgt]*N <image_end> <eos>  ( <human> instruction <assistant> ... )*

A slot holds the <image_patch> id; its input embedding is the projected MingTok semantic
feature of that latent, so the slots of an image carry the image whatever the task. With
the other tokenizers (models/univision.py image_kind) a slot's row of image_latents is a
UniTok position's K integer codes (kept integer), or one of TUNA's N latent tokens (the
VAE grid cut by Tuna.tokens_from_latents); the formats are the same.

Targets are stored already shifted, per position: text_targets[i] is the token that
position i predicts (-100: none) and image_targets[i] marks a slot whose latent the
hidden state at i - 1 predicts (<image_start> predicts the first latent). Loss falls on
the assistant's answer and <eos>, and for a generated image on <image_start> (deciding to
draw), every latent, <image_end> and <eos>. Because targets never cross a document
boundary, packing is concatenation. `turn_ids` tells which assistant turn a text target
belongs to (the text loss averages per turn).

Classifier-free guidance is trained by `drop`: "text" removes the caption/instruction of
the (last) human turn, "turn" removes that whole turn. These are exactly the sequences
that guided generation's text-unconditional and unconditional branches see once their
masked keys are removed (generation compacts positions over visible keys).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch

from uniloom.models.special_tokens import (
    ASSISTANT,
    EOS,
    HUMAN,
    IMAGE_END,
    IMAGE_PATCH,
    IMAGE_START,
    PAD,
    SPECIAL_IDS,
)

TASKS = ("understanding", "text_to_image", "text", "editing")
IGNORE = -100
Drop = Literal["none", "text", "turn"]


@dataclass
class Sample:
    input_ids: torch.Tensor  # (T,) long
    image_mask: torch.Tensor  # (T,) bool: image-patch slots
    text_targets: torch.Tensor  # (T,) long: token predicted at each position, IGNORE for none
    image_latents: torch.Tensor  # (P, C): the slots' latents (UniTok: long codes) in sequence order
    image_targets: torch.Tensor  # (T,) bool: slots whose latent is generated
    task: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class SequenceBuilder:
    """Appends tokens and images, keeping targets aligned; `spans` records named ranges."""

    def __init__(self, latent_dim: int = 32):
        self.ids: list[int] = []
        self.targets: list[int] = []
        self.slot: list[bool] = []
        self.generated: list[bool] = []
        self.latents: list[torch.Tensor] = []
        self.latent_dim = latent_dim

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self, ids: Sequence[int], loss: bool = False) -> SequenceBuilder:
        """Append `ids`; with loss, each is the target of the position before it."""
        for token in ids:
            if loss:
                if not self.ids:
                    raise ValueError("the first token of a sequence has no position to predict it from")
                self.targets[-1] = int(token)
            self.ids.append(int(token))
            self.targets.append(IGNORE)
            self.slot.append(False)
            self.generated.append(False)
        return self

    def image(self, latents_NC: torch.Tensor, generate: bool = False) -> SequenceBuilder:
        """<image_start> N slots <image_end>; generate=True makes the latents and the two
        delimiters targets."""
        if latents_NC.dim() != 2 or latents_NC.shape[1] != self.latent_dim:
            raise ValueError(f"image latents must be (N, {self.latent_dim}), got {tuple(latents_NC.shape)}")
        self.tokens([SPECIAL_IDS[IMAGE_START]], loss=generate)
        n = latents_NC.shape[0]
        self.ids += [SPECIAL_IDS[IMAGE_PATCH]] * n
        self.targets += [IGNORE] * n
        self.slot += [True] * n
        self.generated += [generate] * n
        latents_NC = latents_NC.detach()
        self.latents.append(latents_NC.float() if latents_NC.is_floating_point() else latents_NC)
        return self.tokens([SPECIAL_IDS[IMAGE_END]], loss=generate)

    def human(self, text_ids: Sequence[int] = (), image: torch.Tensor | None = None) -> SequenceBuilder:
        self.tokens([SPECIAL_IDS[HUMAN]])
        if image is not None:
            self.image(image)
        return self.tokens(text_ids)

    def assistant_text(self, ids: Sequence[int]) -> SequenceBuilder:
        self.tokens([SPECIAL_IDS[ASSISTANT]])
        return self.tokens([*ids, SPECIAL_IDS[EOS]], loss=True)

    def assistant_image(self, latents_NC: torch.Tensor) -> SequenceBuilder:
        self.tokens([SPECIAL_IDS[ASSISTANT]])
        self.image(latents_NC, generate=True)
        return self.tokens([SPECIAL_IDS[EOS]], loss=True)

    def build(self, task: str) -> Sample:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (one of {TASKS})")
        latents = torch.cat(self.latents) if self.latents else torch.zeros(0, self.latent_dim)
        return Sample(
            input_ids=torch.tensor(self.ids, dtype=torch.long),
            image_mask=torch.tensor(self.slot, dtype=torch.bool),
            text_targets=torch.tensor(self.targets, dtype=torch.long),
            image_latents=latents,
            image_targets=torch.tensor(self.generated, dtype=torch.bool),
            task=task,
        )


# ------------------------------------------------------------------------- the four task kinds


def understanding(image_latents_NC, question_ids: Sequence[int], answer_ids: Sequence[int]) -> Sample:
    """Caption (empty question) or VQA: the image and question in, the answer out."""
    return conversation(image_latents_NC, [(question_ids, answer_ids)])


def conversation(image_latents_NC, turns: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Sample:
    """Multi-turn VQA: the image once, in the first human turn, then every (question,
    answer) pair as a turn of its own; every answer (and its <eos>) is a target."""
    if not turns:
        raise ValueError("a conversation needs at least one (question, answer) turn")
    b = SequenceBuilder(image_latents_NC.shape[1])
    for i, (question_ids, answer_ids) in enumerate(turns):
        b.human(question_ids, image=image_latents_NC if i == 0 else None).assistant_text(answer_ids)
    return b.build("understanding")


def text_to_image(caption_ids: Sequence[int], image_latents_NC, drop: Drop = "none") -> Sample:
    b = SequenceBuilder(image_latents_NC.shape[1])
    if drop != "turn":
        b.human(caption_ids if drop == "none" else ())
    return b.assistant_image(image_latents_NC).build("text_to_image")


def text_only(text_ids: Sequence[int], prompt_ids: Sequence[int] | None = None) -> Sample:
    """A plain document (every next token a target), or a prompt/response chat turn."""
    b = SequenceBuilder()
    if prompt_ids is None:
        return b.tokens(text_ids[:1]).tokens([*text_ids[1:], SPECIAL_IDS[EOS]], loss=True).build("text")
    return b.human(prompt_ids).assistant_text(text_ids).build("text")


def editing(
    source_latents_NC, rounds: Sequence[tuple[Sequence[int], torch.Tensor]], drop: Drop = "none"
) -> Sample:
    """Source image + instruction in context, target image generated; later rounds edit the
    previous round's output, which is already in context. `drop` applies to the last round."""
    if not rounds:
        raise ValueError("editing needs at least one (instruction, target) round")
    b = SequenceBuilder(source_latents_NC.shape[1])
    for i, (instruction_ids, target_NC) in enumerate(rounds):
        last = i == len(rounds) - 1
        if not (last and drop == "turn"):
            b.human(
                () if last and drop == "text" else instruction_ids,
                image=source_latents_NC if i == 0 else None,
            )
        b.assistant_image(target_NC)
    return b.build("editing")


# ------------------------------------------------------------------------- generation prompts


@dataclass
class Prompt:
    """A human turn awaiting the assistant: ids (T,), image slots (T,), and the spans the
    guidance branches hide: the turn's text, and the whole turn."""

    input_ids: torch.Tensor
    image_mask: torch.Tensor
    text_mask: torch.Tensor
    turn_mask: torch.Tensor


def prompt(text_ids: Sequence[int], source_tokens: int = 0, image: bool = True) -> Prompt:
    """<human> [<image_start> slot*source_tokens <image_end>] text <assistant> [<image_start>]:
    the context of a generated image (image=True) or of a text answer."""
    b = SequenceBuilder()
    b.tokens([SPECIAL_IDS[HUMAN]])
    if source_tokens:
        b.image(torch.zeros(source_tokens, b.latent_dim))
    text_start = len(b)
    b.tokens(text_ids)
    turn_end = len(b)
    b.tokens([SPECIAL_IDS[ASSISTANT]] + ([SPECIAL_IDS[IMAGE_START]] if image else []))
    pos = torch.arange(len(b))
    return Prompt(
        input_ids=torch.tensor(b.ids),
        image_mask=torch.tensor(b.slot),
        text_mask=(pos >= text_start) & (pos < turn_end),
        turn_mask=pos < turn_end,
    )


# ------------------------------------------------------------------------- batching and packing


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long, PAD after the last document
    image_mask: torch.Tensor  # (B, T) bool
    text_targets: torch.Tensor  # (B, T) long
    image_targets: torch.Tensor  # (B, T) bool
    image_latents: torch.Tensor  # (P, C): slots' latents, rows in order, each in sequence order
    position_ids: torch.Tensor  # (B, T) long: restart at 0 for every document
    doc_ids: torch.Tensor  # (B, T) long: document index within its row, -1 for padding
    task_ids: torch.Tensor  # (B, T) long: index into TASKS of the token's document, -1 padding

    def to(self, device) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _rows(groups: list[list[Sample]], seq_len: int) -> Batch:
    B = len(groups)
    out = {
        "input_ids": torch.full((B, seq_len), SPECIAL_IDS[PAD], dtype=torch.long),
        "image_mask": torch.zeros(B, seq_len, dtype=torch.bool),
        "text_targets": torch.full((B, seq_len), IGNORE, dtype=torch.long),
        "image_targets": torch.zeros(B, seq_len, dtype=torch.bool),
        "position_ids": torch.zeros(B, seq_len, dtype=torch.long),
        "doc_ids": torch.full((B, seq_len), -1, dtype=torch.long),
        "task_ids": torch.full((B, seq_len), -1, dtype=torch.long),
    }
    latents = []
    for row, group in enumerate(groups):
        start = 0
        for doc, s in enumerate(group):
            span = slice(start, start + len(s))
            out["input_ids"][row, span] = s.input_ids
            out["image_mask"][row, span] = s.image_mask
            out["text_targets"][row, span] = s.text_targets
            out["image_targets"][row, span] = s.image_targets
            out["position_ids"][row, span] = torch.arange(len(s))
            out["doc_ids"][row, span] = doc
            out["task_ids"][row, span] = TASKS.index(s.task)
            latents.append(s.image_latents)
            start += len(s)
    # Text-only samples hold no latents (and do not know the latent width): leave them out.
    image_latents = torch.cat([z for z in latents if z.shape[0]] or latents[:1])
    return Batch(**out, image_latents=image_latents)


def turn_ids(batch: Batch) -> torch.Tensor:
    """(B, T) long: ids, unique in the batch, of the turn each position belongs to. A turn
    starts at every <assistant> and every document start (a plain text document is one
    turn), so a text target's id names the answer, caption or image it belongs to."""
    starts_BT = (batch.input_ids == SPECIAL_IDS[ASSISTANT]) | (batch.position_ids == 0)
    return starts_BT.flatten().cumsum(0).view_as(starts_BT)


def align_image_starts(input_ids_BT, position_ids_BT, visible_BT, stride: int, shift_B=None):
    """Positions with every visible <image_start> moved up to the next multiple of `stride`
    (UniVisionConfig.image_stride), and each row's shift at the end (B,) for the next call
    of a cached generation. position_ids count visible tokens, restarting at 0 for every
    document (a visible 0 restarts the shift too); `shift_B` is the shift carried in from
    before this call (default 0). On the device, without a loop or a host sync: once a start
    is aligned, the next one in its document moves up by -(its distance from the previous
    start) mod stride, so the shifts are a cumulative sum of those moves per document."""
    B, T = input_ids_BT.shape
    device = position_ids_BT.device
    plain_BT = position_ids_BT.long()
    carried_B = (
        torch.zeros(B, dtype=torch.long, device=device) if shift_B is None else shift_B.long().to(device)
    )
    starts_BT = (input_ids_BT == SPECIAL_IDS[IMAGE_START]) & visible_BT
    restarts_BT = (plain_BT == 0) & visible_BT & (input_ids_BT != SPECIAL_IDS[PAD])
    t_BT = torch.arange(T, device=device).expand(B, T)
    none_BT = torch.full_like(t_BT, -1)
    last_restart_BT = torch.where(restarts_BT, t_BT, none_BT).cummax(1).values  # -1: none yet
    last_start_BT = torch.where(starts_BT, t_BT, none_BT).cummax(1).values
    prev_start_BT = torch.cat([none_BT[:, :1], last_start_BT[:, :-1]], 1)  # the start before t
    same_doc_BT = (prev_start_BT >= 0) & (prev_start_BT >= last_restart_BT)
    # where each start's aligned position is counted from: the previous start in its document,
    # else the document's first position less the shift it starts with (carried, or 0)
    base_BT = torch.where(last_restart_BT < 0, -carried_B[:, None], 0)
    ref_BT = torch.where(same_doc_BT, plain_BT.gather(1, prev_start_BT.clamp_min(0)), base_BT)
    move_BT = torch.where(starts_BT, (ref_BT - plain_BT) % stride, 0)
    total_BT = move_BT.cumsum(1)
    before_restart_BT = (total_BT - move_BT).gather(1, last_restart_BT.clamp_min(0))
    shift_BT = torch.where(last_restart_BT < 0, carried_B[:, None] + total_BT, total_BT - before_restart_BT)
    return position_ids_BT + shift_BT, shift_BT[:, -1]


def collate(samples: Sequence[Sample], seq_len: int | None = None) -> Batch:
    """One sample per row, padded to `seq_len` (default: the longest)."""
    seq_len = seq_len or max(len(s) for s in samples)
    if any(len(s) > seq_len for s in samples):
        raise ValueError(f"a sample is longer than seq_len {seq_len}")
    return _rows([[s] for s in samples], seq_len)


def pack(samples: Sequence[Sample], seq_len: int) -> Batch:
    """Samples, in order, into as few rows of `seq_len` as next-fit allows; documents in a
    row are separated by `doc_ids` (block-diagonal attention) and restart `position_ids`."""
    groups: list[list[Sample]] = []
    used = seq_len
    for s in samples:
        if len(s) > seq_len:
            raise ValueError(f"a {len(s)}-token sample does not fit in seq_len {seq_len}")
        if used + len(s) > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(s)
        used += len(s)
    return _rows(groups, seq_len)
