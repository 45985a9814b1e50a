"""The stages of `uniloom run`, in order, each a thin call into the module that owns it.

corpus -> tokenizer (MingTok MIM training on the corpus) -> data (filter + pre-tokenize
with the trained MingTok) -> train (the unified model's recipe) -> eval -> register
(the `champion` alias of each model moves only when its gate in `eval:` passes).
"""

from __future__ import annotations

import copy
from pathlib import Path

from uniloom.pipelines.config import UniloomConfig
from uniloom.pipelines.workflow import Stage, StageResult

MINGTOK_NAME = "uniloom-mingtok"
UNIVISION_NAME = "uniloom-univision"


def _root(cfg: UniloomConfig) -> Path:
    return Path(cfg.workspace).resolve()


def _echo(line: str) -> None:
    import click

    click.echo(f"  {line}", err=True)


def _numbers(summary: dict, keys) -> dict[str, float]:
    return {k: float(summary[k]) for k in keys if isinstance(summary.get(k), (int, float))}


def _corpus(cfg: UniloomConfig, _: dict[str, StageResult]) -> StageResult:
    from uniloom.pipelines.corpus.synth import synthesize, write_photos

    shards = synthesize(cfg.corpus, _root(cfg) / "corpus")
    photos = write_photos(_root(cfg) / "photos")
    return StageResult(
        outputs={"corpus": str(shards[0].parent), "photos": str(photos)},
        metrics={"corpus_samples": float(cfg.corpus.num), "corpus_shards": float(len(shards))},
    )


def _tokenizer(cfg: UniloomConfig, done: dict[str, StageResult]) -> StageResult:
    from uniloom.pipelines.tokenizer.train import train_tokenizer

    cfg = copy.deepcopy(cfg)
    cfg.tokenizer.corpus = done["corpus"].outputs["corpus"]
    summary = train_tokenizer(cfg, restart=True, echo=_echo)
    metrics = _numbers(summary, ("psnr", "ssim", "detector_agreement", "probe_shape", "probe_color", "steps"))
    outputs = {"weights": summary["weights"]}
    if summary.get("registered_version"):
        metrics["registered_version"] = float(summary["registered_version"])
    return StageResult(outputs=outputs, metrics=metrics)


def _data(cfg: UniloomConfig, done: dict[str, StageResult]) -> StageResult:
    from uniloom.pipelines.data.runner import run
    from uniloom.pipelines.raycluster import init_ray

    cfg = copy.deepcopy(cfg)
    cfg.data.tokenizer_weights = done["tokenizer"].outputs["weights"]
    init_ray(cfg.ray)
    output = str(_root(cfg) / "data")
    inputs = [done["corpus"].outputs["corpus"], str(Path(done["corpus"].outputs["photos"]).parent)]
    summary = run(cfg, inputs, output)
    if summary["errors"]:
        from uniloom.pipelines.errors import UniloomError

        raise UniloomError(f"data stage: {len(summary['errors'])} input shard(s) failed: {summary['errors']}")
    rows = summary["rows"]
    metrics = {k: float(rows[k]) for k in ("read", "written", "quarantined")}
    metrics.update({f"filtered_{name}": float(n) for name, n in rows["filtered"].items()})
    metrics["images_per_s"] = float(summary["images_per_s"])
    return StageResult(outputs={"shards": output}, metrics=metrics)


def _train(cfg: UniloomConfig, done: dict[str, StageResult]) -> StageResult:
    from uniloom.pipelines.train.trainer import train

    cfg = copy.deepcopy(cfg)
    cfg.train.shards = done["data"].outputs["shards"]
    cfg.data.tokenizer_weights = done["tokenizer"].outputs["weights"]
    if not cfg.train.run_name:
        # One Ray Train run per MingTok: rerun on the same shards (a workflow that died
        # mid-training) it resumes; shards of a retrained MingTok start a run of their own
        # instead of meeting the old run's checkpoints.
        from uniloom.pipelines.train.trainer import effective_config, run_name

        cfg.train.run_name = f"{run_name(cfg)}-{effective_config(cfg)[1][:8]}"
    summary = train(cfg, stage=None, echo=_echo)
    metrics = _numbers(
        summary, ("loss_first", "loss_last", "global_step", "tokens_per_s", "registered_version")
    )
    return StageResult(outputs={"export": summary["export"]}, metrics=metrics)


def _eval(cfg: UniloomConfig, done: dict[str, StageResult]) -> StageResult:
    import mlflow

    from uniloom.pipelines.evaluate.univision import evaluate_bundle, load_bundle

    bundle = load_bundle(
        done["train"].outputs["export"], done["data"].outputs["shards"], cfg.data.storage_options
    )
    scores, grids = evaluate_bundle(bundle, cfg.eval, cfg.corpus.seed)
    for name, grid in grids.items():
        mlflow.log_image(grid, f"samples/{name}.png")
    return StageResult(metrics=scores)


def _set_champion(client, name: str, version: float | None) -> bool:
    if not version:
        return False
    client.set_registered_model_alias(name, "champion", str(int(version)))
    return True


def _register(cfg: UniloomConfig, done: dict[str, StageResult]) -> StageResult:
    """Both models were registered by their stages; `champion` moves only past the gate."""
    import mlflow

    from uniloom.pipelines.evaluate.univision import gate_passes

    client = mlflow.MlflowClient()
    tok_ok, tok_failures = gate_passes(done["tokenizer"].metrics, cfg.eval.tokenizer_gate)
    uni_ok, uni_failures = gate_passes(done["eval"].metrics, cfg.eval.gate)
    for name, ok, failures in ((MINGTOK_NAME, tok_ok, tok_failures), (UNIVISION_NAME, uni_ok, uni_failures)):
        _echo(f"{name}: gate {'passed' if ok else 'failed: ' + '; '.join(failures)}")
        mlflow.set_tag(f"gate.{name}", "passed" if ok else "; ".join(failures))
    tok_champion = tok_ok and _set_champion(
        client, MINGTOK_NAME, done["tokenizer"].metrics.get("registered_version")
    )
    uni_champion = uni_ok and _set_champion(
        client, UNIVISION_NAME, done["train"].metrics.get("registered_version")
    )
    return StageResult(
        metrics={"mingtok_champion": float(tok_champion), "univision_champion": float(uni_champion)}
    )


def workflow_stages() -> list[Stage]:
    return [
        Stage("corpus", ("corpus",), _corpus, description="synthesise the compositional corpus and photos"),
        Stage(
            "tokenizer",
            ("mingtok", "tokenizer"),
            _tokenizer,
            ("corpus",),
            "train MingTok (masked image modeling)",
        ),
        Stage(
            "data",
            ("data", "mingtok"),
            _data,
            ("corpus", "tokenizer"),
            "filter and pre-tokenize into Parquet",
        ),
        Stage("train", ("model", "train"), _train, ("data",), "train the unified model (four-stage recipe)"),
        Stage("eval", ("eval",), _eval, ("train",), "generation, VQA and editing on held-out scenes"),
        Stage(
            "register", ("eval",), _register, ("tokenizer", "eval"), "move `champion` where the gate passes"
        ),
    ]
