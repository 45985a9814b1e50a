"""`uniloom eval`, `uniloom generate`, `uniloom edit`: the unified model at work."""

from __future__ import annotations

from pathlib import Path

import click

from uniloom.pipelines.commands.options import config_options, emit, json_option
from uniloom.pipelines.errors import UniloomError

MODEL_HELP = "Exported safetensors file or MLflow URI, e.g. models:/uniloom-univision@champion [default: the workspace's export]."


STEPS_HELP = "Flow-matching sampling steps per latent [default: the model's]."


def _save(images, out: Path, stem: str) -> list[str]:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(images):
        path = out / f"{stem}-{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


TUNE_HELP = (
    "Choose sampling settings on the validation split (eval.val_scenes scenes) instead of scoring "
    "the test split, and print them as a YAML snippet for the preset. Cost: one generated image per "
    "scene for each combination of the image settings in eval.tune_grid, and ~4 answers per scene "
    "for each text temperature; the default grid (12 combinations, 2 temperatures) costs about 3x "
    "a test evaluation of as many scenes (which draws 4 images a scene: 1 + 3 edit rounds)."
)


@click.command("eval")
@click.option("--model", help=MODEL_HELP)
@click.option("--tune", is_flag=True, help=TUNE_HELP)
@config_options
@json_option
def evaluate(model: str | None, tune: bool, cfg, as_json: bool) -> None:
    """Score the unified model on the held-out test split: GenEval-style generation, VQA,
    1 to 3 chained edit rounds and the reconstruction of the MingTok it carries, each
    with its n and 95% interval; results go to MLflow (run `eval`)."""
    import mlflow

    from uniloom.pipelines import tracking
    from uniloom.pipelines.evaluate.loading import resolve_model
    from uniloom.pipelines.evaluate.report import format_table, log_evaluation
    from uniloom.pipelines.evaluate.univision import evaluate_bundle, gate_passes

    bundle = resolve_model(cfg, model)
    e = cfg.eval
    if tune:
        from uniloom.pipelines.evaluate.tune import preset_snippet
        from uniloom.pipelines.evaluate.tune import tune as tune_sampling

        click.echo(f"tuning sampling on {e.val_scenes} validation scenes", err=True)
        with tracking.stage_run(cfg, "eval-tune"):
            best, trials, tags = tune_sampling(bundle, e, cfg.corpus.seed, cfg.corpus.max_objects,
                                               echo=lambda m: click.echo(m, err=True))  # fmt: skip
            mlflow.set_tags(tags)
            mlflow.log_params({f"tuned.{k}": v for k, v in best.items()})
            columns = sorted({k for t in trials for k in t})
            mlflow.log_table({k: [t.get(k) for t in trials] for k in columns}, artifact_file="eval/tune.json")
        snippet = preset_snippet(best, e.val_scenes)
        if as_json:
            emit({"best": best, "trials": trials, "preset_snippet": snippet}, as_json)
        else:
            click.echo(snippet, nl=False)
        return
    click.echo(f"evaluating on {e.scenes} held-out test scenes", err=True)
    with tracking.stage_run(cfg, "eval"):
        evaluation = evaluate_bundle(bundle, e, cfg.corpus.seed, cfg.corpus.max_objects)
        log_evaluation(evaluation)
    click.echo(format_table(evaluation.metrics), err=True)
    passed, failures = gate_passes(evaluation.metrics, e.gate)
    emit(
        {
            **{k: round(v, 4) for k, v in evaluation.metrics.items()},
            "gate_passed": passed,
            "gate_failures": failures,
        },
        as_json,
    )


@click.command()
@click.argument("prompt")
@click.option("--model", help=MODEL_HELP)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default="generated", show_default=True
)
@click.option("--num", type=int, default=1, show_default=True, help="Images for the prompt.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, help=STEPS_HELP)
@config_options
@json_option
def generate(
    prompt: str, model: str | None, out: Path, num: int, seed: int, steps, cfg, as_json: bool
) -> None:
    """Generate images from a text PROMPT."""
    import torch

    from uniloom.models.generation import generate as generate_images
    from uniloom.pipelines.device import device_of, generator
    from uniloom.pipelines.evaluate.loading import resolve_model
    from uniloom.pipelines.tokenizer.data import to_uint8

    if not prompt.strip():
        raise UniloomError("the prompt is empty")
    if num < 1:
        raise UniloomError(f"--num must be at least 1, got {num}")
    bundle = resolve_model(cfg, model)
    ids = bundle.encode(prompt)
    with torch.no_grad():
        turn = generate_images(
            bundle.model,
            bundle.tokenizer,
            [ids] * num,
            steps=steps,
            generator=generator(device_of(bundle.model), seed),
        )
    emit({"prompt": prompt, "images": _save(to_uint8(turn.images), out, "generated")}, as_json)


@click.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--instruction", "instructions", multiple=True, required=True, help="One per round, in order.")
@click.option("--model", help=MODEL_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="edited", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, help=STEPS_HELP)
@config_options
@json_option
def edit(
    image: Path,
    instructions: tuple[str, ...],
    model: str | None,
    out: Path,
    seed: int,
    steps,
    cfg,
    as_json: bool,
) -> None:
    """Edit IMAGE over one or more rounds; later rounds continue from the model's cache."""
    import torch

    from uniloom.models.generation import edit as edit_round
    from uniloom.pipelines.device import device_of, generator
    from uniloom.pipelines.evaluate.loading import resolve_model
    from uniloom.pipelines.tokenizer.data import decode_image, to_uint8, to_unit

    if any(not text.strip() for text in instructions):
        raise UniloomError("an --instruction is empty")
    bundle = resolve_model(cfg, model)
    pixels = decode_image(image.read_bytes(), bundle.tokenizer.cfg.image_size, str(image))
    where = device_of(bundle.model)
    source = to_unit(pixels[None], where)
    state, paths, gen = None, [], generator(where, seed)
    with torch.no_grad():
        for round_index, text in enumerate(instructions):
            turn = edit_round(bundle.model, bundle.tokenizer, state, [bundle.encode(text)],
                              source_images=source if state is None else None, steps=steps, generator=gen)  # fmt: skip
            state = turn.state
            paths += _save(to_uint8(turn.images), out, f"round{round_index + 1}")
    emit({"image": str(image), "instructions": list(instructions), "images": paths}, as_json)
