"""Ablations behind the tiny preset's settings (README, "What the models learn today"): the
unified model trained from scratch in one process with `--set` overrides, on the same seed
and batches; GenEval on validation scenes, and where an object's colour is decided.

    uniloom corpus synth --out ws/corpus --preset small
    uniloom tokenizer train ...                     # or any MingTok export
    uniloom data run --input ws/corpus --output ws/data --set data.tokenizer_weights=MINGTOK
    # model.coarse_codes (80% text to image, 30 warm-up steps):
    python notebooks/ablate.py --shards ws/data --weights MINGTOK --out k0.json \\
        --t2i 0.8 --text 0 --warmup 30 --set model.coarse_codes=0
    # train.input_noise (the tiny preset's mix):
    python notebooks/ablate.py --shards ws/data --weights MINGTOK --out noise.json --set train.input_noise=1.0

Each run trains `--steps` optimizer steps (batches of 8 rows of 320 tokens, lr 1.5e-3,
cosine to 0.1 after the warm-up) with PlainLoop, the plain PyTorch loop `uniloom bench
train` compares against. Every `--eval-every` steps, with the model's own sampling
(guidance 3), on validation scenes:

    single_colour, single_shape   single-object prompts (`--single` of them): the share of
                                  images with one object, of the caption's colour / shape
    hidden_colour_probe           a linear probe, fitted on half of 400 single-object scenes
                                  and scored on the other half, of the caption's colour from
                                  the hidden state that predicts the object's first patch
                                  (given the true image before it). Compare runs at equal
                                  steps: an untrained network's random features score high
                                  too, and training first trades them for the image prefix
    drawn_colour                  the colour of the latent the flow head draws there (coarse
                                  code drawn too), by a probe fitted on true latents
    edit_success, edit_kept,      with `--edits N` (and an `--editing` share of the batches):
    edit_psnr_target/_source      one edit round on N validation scenes, fed the rendered
                                  source: success as `uniloom eval` judges it, the share of
                                  objects the edit leaves that stay where they were, and
                                  the PSNR of the output to the target and to the source
and at the end GenEval on `--scenes` validation scenes of every kind.

    # model.image_stride (editing: 55% edit chains as in the recipe's edit stage):
    python notebooks/ablate.py --shards ws/data --weights MINGTOK --out stride.json --t2i 0.25 \
        --editing 0.55 --edits 128 --steps 3000 --eval-every 1000 --single 60 --scenes 128 \
        --set model.image_stride=128
"""

import argparse
import json
import time

import numpy as np
import torch

from uniloom.models import sequence
from uniloom.models.generation import draw_code
from uniloom.pipelines import precision
from uniloom.pipelines.config import load_config
from uniloom.pipelines.corpus.scenes import BACKGROUND, COLORS
from uniloom.pipelines.evaluate.benchmark import (
    GENERATION_KINDS,
    EvalItem,
    edit_succeeded,
    held_out,
    scene_objects,
    score_generation,
)
from uniloom.pipelines.evaluate.config import EvalConfig
from uniloom.pipelines.evaluate.detector import detect, match
from uniloom.pipelines.evaluate.univision import Bundle, _render, _unit, model_callables
from uniloom.pipelines.tokenizer.evaluate import psnr
from uniloom.pipelines.train.bench import PlainLoop
from uniloom.pipelines.train.config import StageConfig
from uniloom.pipelines.train.data import coarse_centers, find_shards
from uniloom.pipelines.train.trainer import text_tokenizer

NAMES = sorted(COLORS)


def fit_probe(X, y):
    """A linear softmax probe of y (n,) from X (n, d), L2-regularised: predict(X') -> labels."""
    mean, std = X.mean(0), X.std(0).clamp_min(1e-6)
    W = torch.zeros(X.shape[1], len(NAMES), requires_grad=True)
    b = torch.zeros(len(NAMES), requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=0.05)
    with torch.enable_grad():
        for _ in range(500):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy((X - mean) / std @ W + b, y) + 1e-3 * W.square().sum()
            loss.backward()
            opt.step()
    return lambda Z: ((Z - mean) / std @ W + b).argmax(-1)


@torch.no_grad()
def colour_probes(model, tok, encode, n: int = 400) -> dict:
    """hidden_colour_probe and drawn_colour at single objects' first patches (raster
    order), teacher-forced; see the module docstring."""
    torch.manual_seed(0)
    items = held_out(0, n, 4, kinds=("single",), split="val")
    size, p = tok.cfg.image_size, tok.cfg.patch_size
    renders = [_render(i.scene["objects"], size) for i in items]
    z_BNC = tok.encode(_unit(renders, "cpu"))
    y = torch.tensor([NAMES.index(i.objects[0].color) for i in items])
    first = []  # the first patch an object's pixel falls in
    for image in renders:
        drawn = np.abs(image.astype(int) - np.array(BACKGROUND)).sum(-1) > 30
        first.append(int(np.flatnonzero(drawn.reshape(size // p, p, size // p, p).any((1, 3)))[0]))
    hidden, drawn_z = [], []
    for s in range(0, n, 50):
        idx = range(s, min(s + 50, n))
        batch = sequence.collate(
            [sequence.text_to_image(encode(items[i].scene["caption"]), z_BNC[i]) for i in idx]
        )
        features = tok.slot_features(batch.image_latents)
        h = model(batch.input_ids, features, batch.image_mask, position_ids_BT=batch.position_ids,
                  doc_ids_BT=batch.doc_ids).hidden  # fmt: skip
        x0, cond, logits = model.flow_pairs(batch, h)
        if logits is not None:  # the coarse code drawn, as in generation
            cond = (
                cond + model.coarse_embed(draw_code(logits, 1.0)) - model.coarse_embed(model.coarse_code(x0))
            )
        sample = model.flow_head.sample(cond, 16, 1.0).view(len(idx), -1, x0.shape[-1])
        h_BNH = model.shifted_targets(batch, h)[1].view(len(idx), -1, h.shape[-1])
        for j, i in enumerate(idx):
            hidden.append(h_BNH[j, first[i]].float())
            drawn_z.append(sample[j, first[i]].float())
    half = n // 2
    hidden, drawn_z = torch.stack(hidden), torch.stack(drawn_z)
    true_z = torch.stack([z_BNC[i, first[i]] for i in range(n)]).float()
    read = fit_probe(hidden[:half], y[:half])(hidden[half:]) == y[half:]
    drew = fit_probe(true_z[:half], y[:half])(drawn_z[half:]) == y[half:]
    return {"hidden_colour_probe": read.float().mean().item(), "drawn_colour": drew.float().mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--weights", required=True, help="the MingTok the shards were encoded with")
    p.add_argument("--out", required=True, help="JSON file of the evaluations")
    p.add_argument("--set", action="append", default=[], help="config overrides, as uniloom's --set")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--t2i", type=float, default=0.7, help="text-to-image share; the rest understanding")
    p.add_argument("--text", type=float, default=0.05, help="text-only share")
    p.add_argument("--editing", type=float, default=0.0, help="edit-chain share")
    p.add_argument("--edits", type=int, default=0, help="validation scenes for the edit round (0: none)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--single", type=int, default=120)
    p.add_argument("--scenes", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides=[f"train.shards={a.shards}", f"data.tokenizer_weights={a.weights}",
                                         "train.micro_batch=8", *a.set])  # fmt: skip
    mix = {"understanding": round(1 - a.t2i - a.text - a.editing, 3), "text_to_image": a.t2i, "text": a.text,
           "editing": a.editing}  # fmt: skip
    stage = StageConfig(["projector", "flow_head", "llm"], {k: v for k, v in mix.items() if v}, 1.5e-3, a.steps,
                        warmup_steps=a.warmup, min_lr_ratio=0.1, anchor_weight=0.0)  # fmt: skip
    loop = PlainLoop(cfg, stage, "cpu")
    model, tok = loop.model.model, loop.model.tokenizer
    if cfg.model.coarse_codes:
        model.set_coarse_centers(
            coarse_centers(find_shards(a.shards, {}), cfg.model.coarse_codes, cfg.train.seed)
        )
    text = text_tokenizer(a.shards, {})
    bundle = Bundle(model, tok, text, {})
    single = held_out(0, a.single, 4, kinds=("single",), split="val")
    items = held_out(cfg.corpus.seed, a.scenes, cfg.corpus.max_objects, kinds=GENERATION_KINDS, split="val")
    edit_items = [  # the first round of each chain
        EvalItem(i.key, {**i.scene, "edits": i.scene["edits"][:1]})
        for i in held_out(cfg.corpus.seed, a.edits, cfg.corpus.max_objects, split="val")
    ]

    def edit_round(edit_chains) -> dict:
        size = tok.cfg.image_size
        outputs = [chain[0] for chain in edit_chains(edit_items)]
        success, kept, anchored_n, to_target, to_source = [], 0, 0, [], []
        for item, image in zip(edit_items, outputs):
            before, change = item.scene["objects"], item.scene["edits"][0]
            success.append(edit_succeeded(before, change, image))
            old_boxes = {tuple(o["bbox"]) for o in before}
            anchored = [o for o in scene_objects(change["objects"]) if o.bbox in old_boxes]
            kept += len(match(detect(image), anchored))
            anchored_n += len(anchored)
            to_target.append(psnr(_render(change["objects"], size)[None], image[None])[0])
            to_source.append(psnr(_render(before, size)[None], image[None])[0])
        return {"edit_success": float(np.mean(success)), "edit_kept": kept / max(anchored_n, 1),
                "edit_psnr_target": float(np.mean(to_target)), "edit_psnr_source": float(np.mean(to_source))}  # fmt: skip

    def evaluate(step: int) -> dict:
        model.eval()
        result = {"step": step, **colour_probes(model, tok, bundle.encode)}
        with precision.autocast(loop.precision, loop.device):
            generate_images, _, edit_chains = model_callables(bundle, EvalConfig(batch=40))
            if edit_items:
                result |= edit_round(edit_chains)
            found = [detect(image) for image in generate_images([i.scene["caption"] for i in single])]
            for attr in ("color", "shape"):
                hits = [
                    len(d) == 1 and getattr(d[0], attr) == getattr(i.objects[0], attr)
                    for i, d in zip(single, found)
                ]
                result[f"single_{'colour' if attr == 'color' else attr}"] = float(np.mean(hits))
            if step == a.steps:
                scores = score_generation(items, generate_images([i.scene["caption"] for i in items]))
                result |= {"overall": scores.overall, **{k: v.value for k, v in scores.per_category.items()}}
        model.train()
        return result

    log, losses, start = [], [], time.time()
    for step in range(1, a.steps + 1):
        batch = next(loop.batches).to(loop.device)
        with precision.autocast(loop.precision, loop.device):
            out = loop.model(batch)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(loop.params, cfg.train.grad_clip)
        loop.opt.step()
        loop.sched.step()
        loop.opt.zero_grad(set_to_none=True)
        losses.append([float(out.text.detach()), float(out.flow.detach()), float(out.code.detach())])
        if step % 50 == 0:
            text_loss, flow, code = np.mean(losses[-50:], 0)
            print(
                f"step {step} text {text_loss:.3f} flow {flow:.3f} code {code:.3f} {time.time() - start:.0f} s"
            )
        if step % a.eval_every == 0:
            log.append(evaluate(step))
            print(json.dumps(log[-1]), flush=True)
            with open(a.out, "w") as f:
                json.dump(log, f)


if __name__ == "__main__":
    main()
