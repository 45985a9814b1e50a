"""The coarse-code ablation behind the tiny preset's `model.coarse_codes` (README, "What
the models learn today"): the unified model trained from scratch in one process, with and
without coarse codes, on the same seed and batches; GenEval on validation scenes.

    uniloom corpus synth --out ws/corpus --preset small
    uniloom tokenizer train ...                     # or any MingTok export
    uniloom data run --input ws/corpus --output ws/data --set data.tokenizer_weights=MINGTOK
    python notebooks/ablate_coarse_codes.py 0  --shards ws/data --weights MINGTOK --out k0.json
    python notebooks/ablate_coarse_codes.py 64 --shards ws/data --weights MINGTOK --out k64.json

Each run trains `--steps` optimizer steps (batches of 8 rows of 320 tokens, 80% text to
image, lr 1.5e-3 after 30 warm-up steps, cosine to 0.1) with PlainLoop, the plain PyTorch
loop `uniloom bench train` compares against, and scores GenEval on `--scenes` validation
scenes every `--eval-every` steps with the model's own sampling (guidance 3).
"""

import argparse
import json
import time

import numpy as np
import torch

from uniloom.pipelines import precision
from uniloom.pipelines.config import load_config
from uniloom.pipelines.evaluate.benchmark import GENERATION_KINDS, held_out, score_generation
from uniloom.pipelines.evaluate.config import EvalConfig
from uniloom.pipelines.evaluate.univision import Bundle, model_callables
from uniloom.pipelines.train.bench import PlainLoop
from uniloom.pipelines.train.config import StageConfig
from uniloom.pipelines.train.data import coarse_centers, find_shards
from uniloom.pipelines.train.trainer import text_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("codes", type=int, help="model.coarse_codes (0: the flow head alone)")
    p.add_argument("--shards", required=True)
    p.add_argument("--weights", required=True, help="the MingTok the shards were encoded with")
    p.add_argument("--out", required=True, help="JSON file of the evaluations")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--scenes", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides=[f"model.coarse_codes={a.codes}", f"train.shards={a.shards}",
                                         f"data.tokenizer_weights={a.weights}", "train.micro_batch=8"])  # fmt: skip
    stage = StageConfig(["projector", "flow_head", "llm"], {"understanding": 0.2, "text_to_image": 0.8}, 1.5e-3,
                        a.steps, warmup_steps=30, min_lr_ratio=0.1, anchor_weight=0.0)  # fmt: skip
    loop = PlainLoop(cfg, stage, "cpu")
    model = loop.model.model
    if a.codes:
        model.set_coarse_centers(coarse_centers(find_shards(a.shards, {}), a.codes, cfg.train.seed))
    text = text_tokenizer(a.shards, {})
    items = held_out(cfg.corpus.seed, a.scenes, cfg.corpus.max_objects, kinds=GENERATION_KINDS, split="val")

    def evaluate(step: int) -> dict:
        model.eval()
        with precision.autocast(loop.precision, loop.device):
            generate_images, _, _ = model_callables(
                Bundle(model, loop.model.tokenizer, text, {}), EvalConfig()
            )
            scores = score_generation(items, generate_images([i.scene["caption"] for i in items]))
        model.train()
        return {
            "step": step,
            "overall": scores.overall,
            **{k: v.value for k, v in scores.per_category.items()},
        }

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
