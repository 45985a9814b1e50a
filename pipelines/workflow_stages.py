"""The stages of `uniloom run`, in order, each a thin call into the module that owns it.

corpus -> tokenizer (tokenizer.kind: MingTok, UniTok or TUNA trained on the corpus) ->
data (filter + pre-tokenize with the trained tokenizer) -> train (the unified model's recipe) -> eval -> register
(the `champion` alias of each model moves only when its gate in `eval:` passes).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import posixpath
import time
from typing import Any

from uniloom.pipelines import progress
from uniloom.pipelines.config import UniloomConfig, to_dict
from uniloom.pipelines.data.fs import open_fs
from uniloom.pipelines.workflow import Stage, StageResult, code_fingerprint
from uniloom.pipelines.workspace import fetched, is_remote, publish, scratch, workspace_uri

MINGTOK_NAME = "uniloom-mingtok"  # the default kind's; every kind's is kinds.py `registered_name`
UNIVISION_NAME = "uniloom-univision"
# train: keys that decide where a run is stored, what is kept and reported, and the Ray
# resources it asks, not its weights
NOT_WEIGHTS = ("shards", "run_name", "storage", "export", "register", "max_failures", "keep_checkpoints",
               "log_every", "cpus_per_worker", "read_cpus", "bind_cores")  # fmt: skip


def _echo(line: str) -> None:
    import click

    click.echo(f"  {line}", err=True)


def _numbers(summary: dict, keys) -> dict[str, float]:
    return {k: float(summary[k]) for k in keys if isinstance(summary.get(k), (int, float))}


def _corpus(cfg: UniloomConfig, _: dict[str, StageResult]) -> StageResult:
    from uniloom.pipelines.corpus.synth import synthesize, write_photos

    done = 0

    def shard_written(samples: int) -> None:
        nonlocal done
        done += samples
        progress.report("corpus", done, cfg.corpus.num, "samples")

    local = scratch(cfg)  # the workspace itself when it is a local folder
    shards = synthesize(cfg.corpus, local / "corpus", progress=shard_written)
    photos = write_photos(local / "photos")
    if is_remote(cfg.workspace):  # written here, then stored in the workspace for every node
        written = [*shards, photos]
        *shards, photos = [publish(cfg, f, workspace_uri(cfg, *f.relative_to(local).parts)) for f in written]
        for f in written:  # stored: this node keeps no copy
            f.unlink()
    return StageResult(
        outputs={"corpus": posixpath.dirname(str(shards[0])), "photos": str(photos)},
        metrics={"corpus_samples": float(cfg.corpus.num), "corpus_shards": float(len(shards))},
    )


def _tokenizer(cfg: UniloomConfig, done: dict[str, StageResult]) -> StageResult:
    from uniloom.pipelines.evaluate.benchmark import Proportion
    from uniloom.pipelines.tokenizer.train import train_tokenizer
    from uniloom.pipelines.tracking import describe_version, log_dataset

    cfg = copy.deepcopy(cfg)
    cfg.tokenizer.corpus = done["corpus"].outputs["corpus"]
    summary = train_tokenizer(cfg, restart=True, echo=_echo)
    metrics = _numbers(
        summary, ("psnr", "ssim", "detector_agreement", "probe_shape", "probe_color", "steps", "budget_cut")
    )
    if "detector_agreement" in metrics and summary.get("images"):
        # n and interval, so the tokenizer gate judges the agreement by its lower bound
        n = int(summary["images"])
        metrics.update(Proportion(round(metrics["detector_agreement"] * n), n).metrics("detector_agreement"))
    outputs = {"weights": summary["weights"]}
    version = summary.get("registered_version")
    if version:
        metrics["registered_version"] = float(version)
    # lineage: the corpus MingTok trained on, as the run's dataset and on the version
    fs, root = open_fs(cfg.tokenizer.corpus, cfg.data.storage_options)
    corpus = sorted(fs.glob(posixpath.join(root, "*.tar")))
    digest = files_fingerprint(fs, corpus)
    log_dataset(summary["mlflow_run_id"], "uniloom-corpus", cfg.tokenizer.corpus, digest,
                {"shards": len(corpus), "samples": cfg.corpus.num})  # fmt: skip
    if version:
        describe_version(_tokenizer_name(cfg), str(version), {"data.fingerprint": digest})
    return StageResult(outputs=outputs, metrics=metrics)


def _tokenizer_name(cfg: UniloomConfig) -> str:
    from uniloom.pipelines.tokenizer.kinds import kind_of

    return kind_of(cfg).registered_name


def files_fingerprint(fs, paths: list[str]) -> str:
    """Hash of the files' names and contents (`paths` on fsspec filesystem `fs`)."""
    digest = hashlib.sha256()
    for path in paths:
        with fs.open(path, "rb") as f:
            digest.update(posixpath.basename(path).encode() + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def _data(cfg: UniloomConfig, done: dict[str, StageResult]) -> StageResult:
    from uniloom.pipelines.data.discovery import discover
    from uniloom.pipelines.data.runner import run
    from uniloom.pipelines.raycluster import init_ray

    cfg = copy.deepcopy(cfg)
    cfg.data.tokenizer_weights = done["tokenizer"].outputs["weights"]
    init_ray(cfg.ray)
    output = workspace_uri(cfg, "data")
    inputs = [done["corpus"].outputs["corpus"], posixpath.dirname(done["corpus"].outputs["photos"])]
    total, counts, start = len(discover(inputs, cfg.data)), {"shards": 0, "images": 0}, time.perf_counter()

    def committed(shard: str, rows: dict[str, Any]) -> None:
        counts["shards"] += 1
        counts["images"] += rows["read"]
        rate = counts["images"] / (time.perf_counter() - start)
        progress.report("data", counts["shards"], total, "shards",
                        {"images": str(counts["images"]), "images/s": f"{rate:.1f}"})  # fmt: skip

    summary = run(cfg, inputs, output, on_commit=committed)
    if summary["errors"]:
        from uniloom.pipelines.errors import UniloomError

        raise UniloomError(f"data stage: {len(summary['errors'])} input shard(s) failed: {summary['errors']}")
    rows = summary["rows"]
    metrics = {k: float(rows[k]) for k in ("read", "written", "quarantined")}
    metrics.update({f"filtered_{name}": float(n) for name, n in rows["filtered"].items()})
    metrics["images_per_s"] = float(summary["images_per_s"])
    return StageResult(outputs={"shards": output}, metrics=metrics)


def train_identity(cfg: UniloomConfig, mingtok: str | None = None) -> dict[str, Any]:
    """What decides the weights of the train stage, but the recipe's stages: the model
    and train config, the shards, the MingTok (`mingtok`: its fingerprint, where the
    caller has it), the code the train stage runs."""
    from uniloom.pipelines.train.registry import shards_lineage
    from uniloom.pipelines.train.trainer import effective_config, shards_uri

    skip = (*NOT_WEIGHTS, "stages")
    return {
        "model": to_dict(cfg.model),
        "train": {k: v for k, v in to_dict(cfg.train).items() if k not in skip},
        "shards": shards_lineage(shards_uri(cfg), cfg.data.storage_options)[0],
        "mingtok": mingtok or effective_config(cfg)[1],
        "code": code_fingerprint(_train),
    }


def stage_prefixes(cfg: UniloomConfig, mingtok: str | None = None) -> dict[str, str]:
    """Per recipe stage, in order, the fingerprint of the weights at its end: the train
    identity and the settings of that stage and the ones before it. A run that changes only
    stage 3 keeps stages 1-2's, so it can start from another run's end of stage 2."""
    identity = train_identity(cfg, mingtok)
    prefixes, settings = {}, []
    for name, stage in to_dict(cfg.train)["stages"].items():
        settings.append([name, stage])
        blob = json.dumps({**identity, "stages": settings}, sort_keys=True)
        prefixes[name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return prefixes


def train_run_name(cfg: UniloomConfig, prefixes: dict[str, str] | None = None) -> str:
    """The Ray Train run of `uniloom run`: the same for the same inputs, so a workflow that
    died mid-training resumes it; another one when anything that decides the weights
    changed (the last stage's prefix fingerprint: model and train config, the shards, the
    MingTok, the code the train stage runs), so a changed config never meets an old run's
    finished checkpoints. `prefixes`: `stage_prefixes(cfg)`, where the caller has them."""
    from uniloom.pipelines.train.trainer import run_name

    prefixes = prefixes or stage_prefixes(cfg)
    return f"{run_name(cfg)}-{list(prefixes.values())[-1][:12]}"


def _train_setup(cfg: UniloomConfig, done: dict[str, StageResult]) -> tuple[UniloomConfig, dict[str, str]]:
    """`train_config` and the stage prefixes it was named with (computed once: they read
    the data manifest and the training code)."""
    cfg = copy.deepcopy(cfg)
    cfg.train.shards = done["data"].outputs["shards"]
    cfg.data.tokenizer_weights = done["tokenizer"].outputs["weights"]
    prefixes = stage_prefixes(cfg)
    if not cfg.train.run_name:
        cfg.train.run_name = train_run_name(cfg, prefixes)
    return cfg, prefixes


def train_config(cfg: UniloomConfig, done: dict[str, StageResult]) -> UniloomConfig:
    """The config the train stage trains with: the upstream stages' shards and MingTok,
    and, unless `train.run_name` is set, the run `train_run_name` names."""
    return _train_setup(cfg, done)[0]


def _train(cfg: UniloomConfig, done: dict[str, StageResult]) -> StageResult:
    from uniloom.pipelines.train.trainer import train

    cfg, prefixes = _train_setup(cfg, done)
    # per stage, so a new run starts after the longest recipe prefix an earlier run finished
    version = done["tokenizer"].metrics.get("registered_version")
    summary = train(cfg, stage=None, echo=_echo, prefixes=prefixes,
                    tokenizer_version=str(int(version)) if version else None)  # fmt: skip
    metrics = _numbers(
        summary, ("loss_first", "loss_last", "global_step", "tokens_per_s", "registered_version")
    )
    return StageResult(outputs={"export": summary["export"]}, metrics=metrics)


def _eval(cfg: UniloomConfig, done: dict[str, StageResult]) -> StageResult:
    from uniloom.pipelines.evaluate.report import format_table, log_evaluation
    from uniloom.pipelines.evaluate.univision import evaluate_bundle, load_bundle, on_device

    with fetched(cfg, done["train"].outputs["export"]) as export:
        bundle = load_bundle(str(export), done["data"].outputs["shards"], cfg.data.storage_options)
    bundle = on_device(bundle, cfg.eval)
    _echo(f"{cfg.eval.scenes} test scenes (corpus seed {cfg.corpus.seed})")
    evaluation = evaluate_bundle(bundle, cfg.eval, cfg.corpus.seed, cfg.corpus.max_objects,
                                 lambda n, total: progress.report("eval", n, total, "samples"))  # fmt: skip
    for line in format_table(evaluation.metrics).splitlines():
        _echo(line)
    log_evaluation(evaluation, log_metrics=False)  # the workflow logs the stage's metrics
    return StageResult(metrics=evaluation.metrics)


def _set_champion(client, name: str, version: float | None) -> bool:
    if not version:
        return False
    client.set_registered_model_alias(name, "champion", str(int(version)))
    return True


def gate_decisions(cfg: UniloomConfig, tokenizer_metrics: dict, eval_metrics: dict) -> dict[str, list[str]]:
    """Per model, the reasons its `champion` must stay (none: it may move). The unified
    model needs its own gate and its tokenizer's: the tokenizer stage's figures and the
    reconstruction of the MingTok it carries (eval's `tokenizer_*`, changed by joint training)."""
    from uniloom.pipelines.evaluate.univision import gate_passes

    _, tok_failures = gate_passes(tokenizer_metrics, cfg.eval.tokenizer_gate)
    carried = {k.removeprefix("tokenizer_"): v for k, v in eval_metrics.items() if k.startswith("tokenizer_")}
    _, carried_failures = gate_passes(carried, cfg.eval.tokenizer_gate)
    _, uni_failures = gate_passes(eval_metrics, cfg.eval.gate)
    return {
        _tokenizer_name(cfg): tok_failures,
        UNIVISION_NAME: uni_failures
        + [f"its exported tokenizer: {f}" for f in carried_failures]
        + [f"the tokenizer stage's tokenizer: {f}" for f in tok_failures],
    }


def _register(cfg: UniloomConfig, done: dict[str, StageResult]) -> StageResult:
    """Both models were registered by their stages; `champion` moves only past the gates."""
    import mlflow

    client = mlflow.MlflowClient()
    decisions = gate_decisions(cfg, done["tokenizer"].metrics, done["eval"].metrics)
    tokenizer = _tokenizer_name(cfg)
    versions = {
        tokenizer: done["tokenizer"].metrics.get("registered_version"),
        UNIVISION_NAME: done["train"].metrics.get("registered_version"),
    }
    figures = {tokenizer: done["tokenizer"].metrics, UNIVISION_NAME: done["eval"].metrics}
    moved = {}
    for name, failures in decisions.items():
        _echo(f"{name}: gate {'passed' if not failures else 'failed: ' + '; '.join(failures)}")
        mlflow.set_tag(f"gate.{name}", "; ".join(failures) or "passed")
        if versions[name]:
            describe(name, str(int(versions[name])), figures[name], failures)
        moved[name] = not failures and _set_champion(client, name, versions[name])
    return StageResult(
        metrics={
            f"{cfg.tokenizer.kind}_champion": float(moved[tokenizer]),
            "univision_champion": float(moved[UNIVISION_NAME]),
        }
    )


def describe(name: str, version: str, figures: dict[str, float], failures: list[str]) -> None:
    """A registered version's evaluation figures as tags `eval.<metric>`, its gate, and a
    description: what it was trained on (its lineage tags), its figures with n and 95%
    interval, its gate."""
    from uniloom.pipelines.evaluate.report import rows
    from uniloom.pipelines.tracking import describe_version, mlflow_client

    lineage = mlflow_client().get_model_version(name, version).tags
    heads = {
        k: v for k, v in figures.items() if not k.endswith(("_n", "_lo", "_hi")) and k not in NOT_FIGURES
    }
    gate = "; ".join(failures) or "passed"
    tags = {**{f"eval.{k}": f"{v:.4g}" for k, v in heads.items()}, "gate": gate}
    names = {"tokenizer.version": f"{lineage.get('tokenizer.name', MINGTOK_NAME)} version"}
    trained = [f"{names.get(key, label)} {lineage[key]}" for key, label in LINEAGE if key in lineage]
    intervals = {r["metric"]: r for r in rows(figures)}
    shown = [f"{k} {v:.4g}{_interval(intervals.get(k))}" for k, v in heads.items()]
    text = (
        f"Trained on: {', '.join(trained) or 'not recorded'}.\nEvaluation: {'; '.join(shown)}.\nGate: {gate}."
    )
    describe_version(name, version, tags, text)


def _interval(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if math.isnan(row["lo"]):
        return f" (n {int(row['n'])})"
    return f" (n {int(row['n'])}, 95% {row['lo']:.3f}-{row['hi']:.3f})"


# a registered version's lineage tags (set where it was trained), as its description names them
LINEAGE = (
    ("data.fingerprint", "data"),
    ("data.rows", "rows"),
    ("tokenizer.version", "image tokenizer version"),  # describe() names it by tokenizer.name
)
NOT_FIGURES = ("registered_version", "steps")  # in a stage's metrics, but no evaluation


def workflow_stages() -> list[Stage]:
    return [
        Stage("corpus", ("corpus",), _corpus, description="synthesise the compositional corpus and photos"),
        Stage(
            "tokenizer",
            ("tokenizer", "mingtok", "unitok", "tuna"),
            _tokenizer,
            ("corpus",),
            "train the visual tokenizer (tokenizer.kind)",
        ),
        Stage(
            "data",
            ("data", "tokenizer.kind", "mingtok", "unitok", "tuna"),
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
