"""Evaluate an exported unified model on held-out scenes: generation (GenEval-style),
VQA, chained editing and the reconstruction of the image tokenizer it carries (any
kind: pipelines/tokenizer/kinds.py), scored by pipelines/evaluate/benchmark.py with the
scene detector."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import scene_objects
from uniloom.pipelines.evaluate.benchmark import (
    GENERATION_KINDS,
    EvalItem,
    Evaluation,
    evaluate_all,
    held_out,
    proportion,
    score_generation,
    vqa_pairs,
)
from uniloom.pipelines.evaluate.config import EvalConfig


@dataclass
class Bundle:
    """What inference needs: the unified model, its image tokenizer, and the text BPE."""

    model: Any
    tokenizer: Any
    text: Any  # tokenizers.Tokenizer
    metadata: dict[str, Any]
    # Processes evaluating in lock step (training workers with sharded experts): when
    # every one has finished its answers (models.generation.generate_text's all_done).
    all_done: Callable[[Any], bool] | None = None

    def encode(self, text: str) -> list[int]:
        return self.text.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        from uniloom.models.special_tokens import SPECIAL_IDS

        return self.text.decode([i for i in ids if i >= len(SPECIAL_IDS)])


def load_bundle(export: str, shards: str, storage_options: dict | None = None) -> Bundle:
    """The export and the text tokenizer it carries. An export made before exports carried
    one reads it from beside `shards`, the data output it was trained on."""
    from uniloom.pipelines.data.text_tokenizer import fingerprint
    from uniloom.pipelines.errors import UniloomError
    from uniloom.pipelines.train.registry import embedded_text_tokenizer, load_export
    from uniloom.pipelines.train.trainer import text_tokenizer

    model, tokenizer, metadata = load_export(export)
    text = embedded_text_tokenizer(metadata, export)
    if text is None:
        try:
            text = text_tokenizer(shards, storage_options or {})
        except (OSError, KeyError, ValueError, UniloomError) as e:
            raise UniloomError(
                f"{export} carries no text tokenizer (exported by an older uniloom) and none is readable "
                f"beside the shards {shards} ({type(e).__name__}: {e}); set train.shards to the data "
                "output the model was trained on"
            ) from None
        if fingerprint(text) != metadata.get("text_tokenizer"):
            raise UniloomError(
                f"{export} was trained with text tokenizer {metadata.get('text_tokenizer')}, but the "
                f"shards {shards} now have {fingerprint(text)}; set train.shards to the data output "
                "the model was trained on"
            )
    return Bundle(model, tokenizer, text, metadata)


def on_device(bundle: Bundle, e: EvalConfig) -> Bundle:
    """`bundle` with its model and tokenizer moved to eval.device, resolved on this machine."""
    from uniloom.pipelines import device

    where = device.resolve(e.device, device.local_gpus(), "eval.device")
    bundle.model.to(where)
    bundle.tokenizer.to(where)
    return bundle


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _unit(images: list[np.ndarray], device):
    """(B, H, W, 3) uint8 renders -> the model's input (B, 3, H, W) in [-1, 1] on `device`."""
    from uniloom.pipelines.tokenizer.data import to_unit

    return to_unit(np.stack(images).transpose(0, 3, 1, 2), device)


def _render(objects: list[dict[str, Any]], size: int) -> np.ndarray:
    return np.asarray(render(scene_objects(objects), size))


@contextmanager
def inference_precision(bundle: Bundle, e: EvalConfig) -> Iterator[dict[str, str]]:
    """Autocast for `eval.precision` on the model's device; yields the MLflow tags that
    record the precision chosen."""
    from uniloom.pipelines.precision import autocast, resolve, tags

    device = next(bundle.model.parameters()).device
    with autocast(resolve(e.precision, device), device):
        yield tags("eval", e.precision, device)


def model_callables(bundle: Bundle, e: EvalConfig, advance: Callable[[int], None] = lambda n: None):
    """(generate_images, answer, edit_chains) for benchmark.evaluate_all, sampling as `e`
    says (None settings: the model's own); `advance(n)` after each batch of n samples."""
    import torch

    from uniloom.models.generation import edit, generate, generate_text
    from uniloom.pipelines.device import device_of, generator
    from uniloom.pipelines.tokenizer.data import to_uint8

    size = bundle.tokenizer.cfg.image_size
    mc = bundle.model.cfg
    where = device_of(bundle.model)
    gen = generator(where, e.seed)
    scales = (
        mc.cfg_text_uncond_scale if e.cfg_text_uncond_scale is None else e.cfg_text_uncond_scale,
        mc.cfg_cond_scale if e.cfg_cond_scale is None else e.cfg_cond_scale,
    )
    sampling = {"steps": e.flow_steps or None, "temperature": e.temperature,
                "coarse_temperature": e.coarse_temperature, "guidance": e.guidance, "scales": scales,
                "generator": gen}  # fmt: skip

    @torch.no_grad()
    def generate_images(captions: list[str]) -> list[np.ndarray]:
        out = []
        for chunk in _batches(captions, e.batch):
            turn = generate(bundle.model, bundle.tokenizer, [bundle.encode(c) for c in chunk], **sampling)
            out.extend(to_uint8(turn.images))
            advance(len(chunk))
        return out

    @torch.no_grad()
    def answer(items: list[EvalItem], questions: list[str]) -> list[str]:
        out = []
        for chunk in _batches(list(zip(items, questions, strict=True)), e.batch):
            images = _unit([_render(i.scene["objects"], size) for i, _ in chunk], where)
            turn = generate_text(bundle.model, [bundle.encode(q) for _, q in chunk], tokenizer=bundle.tokenizer,
                                 images=images, max_new_tokens=8, temperature=e.text_temperature,
                                 generator=gen, all_done=bundle.all_done)  # fmt: skip
            out.extend(bundle.decode(ids) for ids in turn.ids)
            advance(len(chunk))
        return out

    @torch.no_grad()
    def edit_chains(items: list[EvalItem]) -> list[list[np.ndarray]]:
        """Round 1 encodes the rendered source once; every later round edits the model's
        previous output from its cache (features, never re-encoded pixels)."""
        out = []
        for chunk in _batches(items, e.batch):
            state, rounds = None, []
            for r in range(len(chunk[0].scene["edits"])):
                ids = [bundle.encode(i.scene["edits"][r]["instruction"]) for i in chunk]
                sources = (
                    _unit([_render(i.scene["objects"], size) for i in chunk], where)
                    if state is None
                    else None
                )
                turn = edit(bundle.model, bundle.tokenizer, state, ids, source_images=sources, **sampling)
                state = turn.state
                rounds.append(to_uint8(turn.images))
            out.extend([list(images) for images in zip(*rounds, strict=True)])
            advance(len(chunk))
        return out

    return generate_images, answer, edit_chains


def tokenizer_reconstruction(tokenizer, items: list[EvalItem], batch: int) -> dict[str, float]:
    """PSNR and detector agreement (the detector recovers the exact scene) of `tokenizer`'s
    reconstructions of the items' renders: the MingTok a unified model carries may have
    drifted from the tokenizer stage's through joint training."""
    from uniloom.pipelines.evaluate.detector import detect, scene_recovered
    from uniloom.pipelines.tokenizer.evaluate import psnr, reconstruct_all

    size = tokenizer.cfg.image_size
    originals = np.stack([_render(i.scene["objects"], size) for i in items])  # (B, H, W, 3)
    recons = reconstruct_all(tokenizer, originals.transpose(0, 3, 1, 2), batch)
    recovered = [scene_recovered(detect(r), i.objects) for r, i in zip(recons, items, strict=True)]
    return {
        "tokenizer_psnr": float(psnr(originals, recons).mean()),
        "tokenizer_psnr_n": float(len(items)),
        **proportion(recovered).metrics("tokenizer_detector_agreement"),
    }


def teacher_forced(bundle: Bundle, e: EvalConfig, items: list[EvalItem]) -> dict[str, float]:
    """Drawing given the true prefix: each latent of a held-out scene's image is sampled
    from the per-token flow head conditioned on the caption and the scene's own earlier
    latents (encoded renders), then the image is decoded and judged like a generated one.
    With the held-out flow-matching loss of the same latents, this separates the per-token
    conditional (the head and what the LLM tells it) from errors that compound when the
    model continues its own samples: a model that fails here fails before exposure bias.
    Nothing for a kind without a per-token flow head (kinds.py `token_flow_head`)."""
    import torch

    from uniloom.models import sequence
    from uniloom.models.generation import draw_code
    from uniloom.pipelines.device import device_of, generator
    from uniloom.pipelines.tokenizer.data import to_uint8
    from uniloom.pipelines.tokenizer.kinds import kind_for

    model, tok = bundle.model, bundle.tokenizer
    kind = kind_for(tok)
    head = kind.token_flow_head(model)
    if head is None:
        return {}
    where = device_of(model)
    gen = generator(where, e.seed)
    size, n = tok.cfg.image_size, tok.cfg.num_tokens
    steps = e.flow_steps or model.cfg.flow_steps
    temperature = model.cfg.temperature if e.temperature is None else e.temperature
    code_temperature = model.cfg.coarse_temperature if e.coarse_temperature is None else e.coarse_temperature
    images, losses = [], []
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(e.seed)  # the flow loss's times and noise
        for chunk in _batches(items, e.batch):
            z_BNC = kind.values(tok, _unit([_render(i.scene["objects"], size) for i in chunk], where)).cpu()
            batch = sequence.collate(
                [
                    sequence.text_to_image(bundle.encode(i.scene["caption"]), z_NC)
                    for i, z_NC in zip(chunk, z_BNC)
                ]
            ).to(where)
            features = kind.loss_inputs(tok, batch)["image_features_PD"]
            hidden = model(batch.input_ids, features, batch.image_mask, position_ids_BT=batch.position_ids,
                           doc_ids_BT=batch.doc_ids).hidden  # fmt: skip
            x0, cond, logits = model.flow_pairs(batch, hidden)
            losses.append(head.loss(x0.to(cond.dtype), cond, batch_mul=4).float())
            if logits is not None:  # the coarse code drawn, as in generation, not the true one
                drawn = draw_code(logits, code_temperature, gen)
                cond = cond + model.coarse_embed(drawn) - model.coarse_embed(model.coarse_code(x0))
            z = head.sample(cond, steps, temperature, generator=gen)
            images.extend(to_uint8(kind.decode(tok, z.view(len(chunk), n, -1))))
    scores = score_generation(items, images)
    return {"flow_loss_heldout": float(torch.cat(losses).mean()), "flow_loss_heldout_n": float(len(items)),
            "geneval_teacher_forced": scores.overall, "geneval_teacher_forced_n": float(len(items))}  # fmt: skip


def evaluate_items(
    bundle: Bundle, e: EvalConfig, items: list[EvalItem], progress: Callable[[int, int], None] | None = None
) -> Evaluation:
    """Generation, VQA and editing scores of `items` in `eval.precision`; `progress(done,
    total)` after each batch (samples: images drawn, questions answered, edit chains)."""
    total = sum(i.scene["kind"] in GENERATION_KINDS for i in items) + len(vqa_pairs(items)) + len(items)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    with inference_precision(bundle, e) as tags:
        evaluation = evaluate_all(items, *model_callables(bundle, e, advance))
    evaluation.tags = tags
    return evaluation


def evaluate_bundle(
    bundle: Bundle,
    e: EvalConfig,
    corpus_seed: int,
    max_objects: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Every score on the test split (`e.scenes` scenes), the carried tokenizer's
    reconstruction included, with example images per category and edit round."""
    items = held_out(corpus_seed, e.scenes, max_objects, split="test")
    evaluation = evaluate_items(bundle, e, items, progress)
    with inference_precision(bundle, e):
        evaluation.metrics.update(tokenizer_reconstruction(bundle.tokenizer, items, e.batch))
        evaluation.metrics.update(teacher_forced(bundle, e, items))
    return evaluation


def gate_passes(scores: dict[str, float], gate: dict[str, float]) -> tuple[bool, list[str]]:
    """Whether every gated metric reaches its minimum; the failures, named. A metric with
    a 95% interval is judged by its lower bound, so few scenes cannot pass by luck."""
    failures = []
    for name, minimum in gate.items():
        value, lo = scores.get(name), scores.get(f"{name}_lo")
        if value is None:
            failures.append(f"{name} missing (gate {minimum})")
        elif lo is None and not value >= minimum:
            failures.append(f"{name} {value:.3f} < {minimum}")
        elif lo is not None and not lo >= minimum:
            n = int(scores.get(f"{name}_n", 0))
            failures.append(f"{name} {value:.3f} (n {n}, 95% lower bound {lo:.3f}) < {minimum}")
    return not failures, failures
