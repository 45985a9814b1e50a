"""`uniloom train`: the driver of a Ray Train + DeepSpeed run of the unified model.

    shards (manifest) -> fingerprint checks -> ray.data.read_parquet -> TorchTrainer
    (ScalingConfig workers, RunConfig name + storage_path, FailureConfig(max_failures),
    one streaming split per worker; pipelines/train/loop.py) -> final checkpoint ->
    consolidated safetensors (the weight EMA where the run keeps one) -> MLflow (one run for the whole training run, across
    restarts; registered model `uniloom-univision`)

Rerunning with the same run name and storage resumes from the run's latest checkpoint
(with any number of workers); a worker that dies mid-run is restarted by Ray Train from
that checkpoint, up to `train.max_failures` times.

Given the recipe's prefix fingerprints (`uniloom run`: workflow_stages.stage_prefixes), a
run records them in its folder (PREFIXES) and keeps a copy of each stage's final checkpoint
but the last (STAGE_ENDS: Ray Train keeps only the last few); a new run (no checkpoint of its own) starts
after the longest prefix another run in the same storage finished, from that copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import posixpath
import sys
import time
from collections.abc import Callable
from typing import Any

from uniloom.pipelines.config import UniloomConfig, to_dict
from uniloom.pipelines.data.fs import join, open_fs, to_uri
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train import recipe
from uniloom.pipelines.train.data import (
    check_image_kind,
    check_image_tokenizer,
    coarse_centers,
    find_shards,
    read_dataset,
)
from uniloom.pipelines.workspace import publish, ray_storage, staging, workspace_uri

REGISTERED_NAME = "uniloom-univision"
PREFIXES = "uniloom-prefixes.json"  # in a run's folder: {"prefixes": {stage: prefix fingerprint}}
STAGE_ENDS = "stage-ends"  # <run>/stage-ends/<stage>/: a copy of the stage's final checkpoint
STAGE_END_DONE = "stage-end.json"  # written last into that copy: {"stage", "prefix", "global_step"}


@contextlib.contextmanager
def ray_output_on_stderr():
    """For commands that end with a --json line: what Ray forwards from its processes
    (worker output, raylet warnings) goes to stderr, and Ray is shut down before the
    summary, so no late log line follows it on stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        try:
            yield
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()


def shards_uri(cfg: UniloomConfig) -> str:
    return cfg.train.shards or workspace_uri(cfg, "data")


def storage_uri(cfg: UniloomConfig) -> str:
    return cfg.train.storage or workspace_uri(cfg, "ray_results")


def run_name(cfg: UniloomConfig) -> str:
    return cfg.train.run_name or f"univision-{cfg.preset}"


def export_path(cfg: UniloomConfig) -> str:

    return cfg.train.export or workspace_uri(cfg, "univision", "univision.safetensors")


def effective_config(cfg: UniloomConfig) -> tuple[UniloomConfig, str]:
    """The config as the data stage saw it (the tokenizer weights' own architecture, as
    the section of their kind, and resolved path: pipelines/data/image_tokenizer.resolve_weights),
    and the tokenizer fingerprint the shards must carry."""
    from uniloom.models.generation import check_tokenizer
    from uniloom.pipelines.data.image_tokenizer import fingerprint, resolve_weights
    from uniloom.pipelines.tokenizer.kinds import kind_for_config

    uri, weights, tok_cfg = resolve_weights(cfg)
    data = dataclasses.replace(cfg.data, tokenizer_weights=uri)
    cfg = dataclasses.replace(cfg, data=data, **{kind_for_config(tok_cfg).name: tok_cfg})
    try:
        check_tokenizer(cfg.model, tok_cfg)
    except ValueError as e:
        raise UniloomError(f"{e}: the tokenizer weights {uri} do not fit the model section") from None
    return cfg, fingerprint(tok_cfg, weights)


def expert_parallel_size(cfg: UniloomConfig, workers: int) -> int:
    from uniloom.pipelines.train.expert_parallel import effective_ep

    return effective_ep(cfg.train.expert_parallel, workers, cfg.model.num_experts)


def text_tokenizer(shards_uri_: str, storage_options: dict):
    """The BPE recorded beside the shards, refused unless it is the one every shard was
    tokenized with (the manifest's record and the file can change under a later data run)."""
    from uniloom.pipelines.data.manifest import Manifest
    from uniloom.pipelines.data.text_tokenizer import fingerprint, load_from_output

    tok = load_from_output(shards_uri_, storage_options)
    fp = fingerprint(tok)
    manifest = Manifest.load(shards_uri_, storage_options)
    recorded = (manifest.data.get("text_tokenizer") or {}).get("fingerprint")
    used = sorted({e["stage"]["text_tokenizer"] for e in manifest.shards.values()} - {fp})
    problem = None
    if recorded != fp:
        problem = f"the manifest records text tokenizer {recorded}, but its file has fingerprint {fp}"
    elif used:
        problem = f"its shards were tokenized with text tokenizer {', '.join(used)}, not the recorded {fp}"
    if problem:
        raise UniloomError(
            f"{manifest.uri}: {problem}; rerun `uniloom data run --output {shards_uri_}` to bring the "
            "shards and their tokenizer together"
        )
    return tok


@dataclasses.dataclass
class Start:
    """Another run's end-of-stage checkpoint a new run starts from."""

    run: str
    stage: str  # the stage it is the end of
    uri: str  # its folder
    meta: dict[str, Any]


def record_prefixes(fs, run_dir: str, prefixes: dict[str, str]) -> None:
    """The run's prefix fingerprints, written once, when it first starts."""
    path = join(run_dir, PREFIXES)
    if not fs.exists(path):
        fs.makedirs(run_dir, exist_ok=True)
        fs.pipe_file(path, json.dumps({"prefixes": prefixes}, indent=1).encode())


def _read_json(fs, path: str) -> dict[str, Any]:
    try:
        return json.loads(fs.cat_file(path))
    except ValueError as e:
        raise UniloomError(f"{path} is corrupt ({e}): remove it (or its run) from the storage") from None


def find_start(fs, storage: str, own: str, prefixes: dict[str, str]) -> Start | None:
    """The checkpoint a new run `own` starts from: the end of stage k of another run in
    `storage` for the largest k below the recipe's length where that run recorded our prefix
    fingerprint of stage k and finished its copy of stage k's end; None: from scratch."""
    names = list(prefixes)[:-1]  # the whole recipe matching is the same run
    if not names or not fs.exists(storage):
        return None
    best: tuple[int, Start] | None = None
    for run_dir in sorted(fs.ls(storage, detail=False)):
        run, record = posixpath.basename(run_dir.rstrip("/")), join(run_dir, PREFIXES)
        if run == own or not fs.exists(record):
            continue
        theirs = _read_json(fs, record).get("prefixes", {})
        for k in range(len(names), best[0] if best else 0, -1):
            name = names[k - 1]
            folder = join(run_dir, STAGE_ENDS, name)
            if theirs.get(name) != prefixes[name] or not fs.exists(join(folder, STAGE_END_DONE)):
                continue
            if _read_json(fs, join(folder, STAGE_END_DONE)).get("prefix") != prefixes[name]:
                continue
            meta = _read_json(fs, join(folder, "meta.json"))
            ranks = [f for f in fs.ls(folder, detail=False) if f.endswith(".safetensors")]
            if meta.get("stage") == name and meta.get("done") and len(ranks) == meta.get("world"):
                best = (k, Start(run, name, to_uri(fs, folder), meta))
                break
    return best[1] if best else None


def prepare_job(cfg: UniloomConfig, stages: list[str], image_fp: str) -> dict[str, Any]:
    """Checks that need no Ray, and the job description every worker gets (`cfg` as
    `effective_config` returns it)."""
    d = cfg.data
    shards = find_shards(shards_uri(cfg), d.storage_options)
    check_image_kind(shards, cfg.model.image_kind)
    check_image_tokenizer(shards, image_fp, d.tokenizer_weights)
    tok = text_tokenizer(shards.uri, d.storage_options)
    if tok.get_vocab_size() > cfg.model.vocab_size:
        raise UniloomError(
            f"the shards' text tokenizer has {tok.get_vocab_size()} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}: set model.vocab_size >= {tok.get_vocab_size()}"
        )
    prompt_ids = [tok.encode(p, add_special_tokens=False).ids for p in cfg.train.eval_prompts]
    k = cfg.model.coarse_codes
    coarse = coarse_centers(shards, k, cfg.train.seed).tolist() if k else None
    return {
        "coarse_centers": coarse,  # a fresh model's; a checkpoint carries its own
        "cfg": to_dict(cfg),
        "stages": stages,
        "image_tokenizer": image_fp,
        "text_tokenizer": shards.text_tokenizer,
        "tokenizer_weights": d.tokenizer_weights,
        "eval_prompt_ids": prompt_ids,
        "shards": shards,
        "shards_uri": shards.uri,  # as the driver resolved it: workers run in another folder
    }


def _mlflow_run(cfg: UniloomConfig, fs, run_dir: str, name: str) -> tuple[str, str]:
    """(tracking uri, run id): the run's MLflow run, created on first use and nested
    under the workflow's run when there is one."""
    import mlflow

    from uniloom.pipelines.tracking import configure, log_config
    from uniloom.pipelines.train.metrics import resolve_run

    configure(cfg)

    def create() -> str:
        nested = mlflow.active_run() is not None
        with mlflow.start_run(run_name=name, nested=nested, tags={"uniloom.stage": "train"}) as run:
            log_config(cfg)
        return run.info.run_id

    return mlflow.get_tracking_uri(), resolve_run(fs, run_dir, create)


def worker_resources(t, workers: int) -> tuple[Any, Any]:
    """(ScalingConfig, TorchConfig) of `workers` training workers: one GPU each and NCCL
    where train.device resolves to cuda on the connected Ray cluster, CPUs and gloo
    otherwise. Each worker then resolves train.device again on its own (loop.worker_device):
    Ray shows a worker only the GPUs it was given."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    from uniloom.pipelines import device

    where = device.resolve(t.device, device.ray_gpus(workers), "train.device",
                           f"a GPU for each of the {workers} workers in the Ray cluster")  # fmt: skip
    scaling = ScalingConfig(
        num_workers=workers, use_gpu=where == "cuda", resources_per_worker={"CPU": t.cpus_per_worker}
    )
    return scaling, TorchConfig(backend=device.backend(where))


def run_trainer(cfg: UniloomConfig, job: dict[str, Any], workers: int):
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from uniloom.pipelines.train.loop import train_loop_per_worker

    t = cfg.train
    scaling, torch_config = worker_resources(t, workers)
    ray.data.DataContext.get_current().enable_progress_bars = False
    options = ray.data.ExecutionOptions()
    options.preserve_order = True  # the split's assignment of rows to workers follows the seed
    dataset = read_dataset(job.pop("shards"), t)
    filesystem, storage = ray_storage(storage_uri(cfg), cfg.data.storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        scaling_config=scaling,
        torch_config=torch_config,
        run_config=RunConfig(
            name=run_name(cfg),
            storage_path=storage,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=options),
    )
    return trainer.fit()


def train(cfg: UniloomConfig, stage: int | None = None, workers: int | None = None,
          echo: Callable[[str], None] = print, prefixes: dict[str, str] | None = None,
          tokenizer_version: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Train the requested stages (all: the recipe), export, register; the summary.
    `prefixes`: the recipe's prefix fingerprints (module docstring), None: none kept.
    `tokenizer_version`: the MingTok's registered version, recorded as the run's lineage
    (None: the registered version tagged with these weights' fingerprint, if any)."""
    from uniloom.pipelines.raycluster import init_ray

    started = time.perf_counter()
    t = cfg.train
    workers = workers or t.workers
    stages = recipe.select(t, stage)
    cfg, image_fp = effective_config(cfg)
    job = prepare_job(cfg, stages, image_fp)
    fs, storage = open_fs(storage_uri(cfg), cfg.data.storage_options)
    run_dir = join(storage, run_name(cfg))
    expert_parallel_size(cfg, workers)
    meta, start = recipe.latest_meta(fs, run_dir), None
    if prefixes is not None:
        if list(prefixes) != list(t.stages):
            raise UniloomError(
                f"prefix fingerprints for stages {list(prefixes)}, the recipe has {list(t.stages)}"
            )
        if meta is None and stages == list(t.stages):  # a new run of the whole recipe
            start = find_start(fs, storage, run_name(cfg), prefixes)
        record_prefixes(fs, run_dir, prefixes)
        job["prefixes"], job["stage_ends"] = prefixes, to_uri(fs, join(run_dir, STAGE_ENDS))
    if start is not None:
        meta = start.meta
        job["start_from"] = {"run": start.run, "stage": start.stage, "checkpoint": start.uri}
    elif meta is not None and meta.get("started_from"):
        job["start_from"] = meta["started_from"]  # resuming such a run: its later checkpoints say so too
    plan = recipe.plan_resume(t, stages, meta, job)  # raises on a bad order
    origin = f" of run {start.run} (from {start.uri})" if start else ""
    echo(f"run {run_name(cfg)} in {storage_uri(cfg)}: {plan.describe()}{origin}")
    job["mlflow_uri"], job["mlflow_run_id"] = _mlflow_run(cfg, fs, run_dir, run_name(cfg))
    from uniloom.pipelines.tokenizer.kinds import kind_of

    job["tokenizer_name"] = kind_of(cfg).registered_name
    if tokenizer_version is None:  # a standalone `uniloom train`: the version of these weights
        from uniloom.pipelines.tokenizer.registry import version_of_weights

        tokenizer_version = version_of_weights(job["tokenizer_name"], image_fp)
    job["tokenizer_version"] = tokenizer_version
    if start is not None:
        import mlflow

        mlflow.MlflowClient().set_tag(
            job["mlflow_run_id"], "uniloom.started_from", f"{start.run}/{start.stage}"
        )
    init_ray(cfg.ray)
    echo(f"training {', '.join(plan.todo) or 'nothing'} on {workers} worker(s), expert-parallel size "
         f"{expert_parallel_size(cfg, workers)}, ZeRO {t.zero_stage}, {t.precision}")  # fmt: skip
    result = run_trainer(cfg, job, workers)
    if result.error is not None:
        raise UniloomError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise UniloomError(f"run {run_name(cfg)} produced no checkpoint")
    summary = finish(cfg, result, job)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def finish(cfg: UniloomConfig, result, job: dict[str, Any]) -> dict[str, Any]:
    """Export the last checkpoint as one safetensors file; log and register it."""
    from uniloom.pipelines.tokenizer.kinds import kind_of
    from uniloom.pipelines.train.checkpoint import Reader
    from uniloom.pipelines.train.metrics import RATES
    from uniloom.pipelines.train.registry import export_model, log_and_register, record_lineage

    with result.checkpoint.as_directory() as directory:
        reader = Reader(directory)
        meta = reader.meta
        metadata = {
            "model": to_dict(cfg.model),
            cfg.model.image_kind: to_dict(kind_of(cfg).config(cfg)),  # the tokenizer's config
            "image_tokenizer": job["image_tokenizer"],
            "text_tokenizer": job["text_tokenizer"],
            "stage": meta["stage"],
            "global_step": meta["global_step"],
            # what the export holds: the EMA of what the last stage trained (train/ema.py)
            "ema_decay": cfg.train.ema_decay,
            "ema_updates": meta.get("ema_updates", 0),
            "recipe": to_dict(cfg.train)["stages"],  # the stages' settings the weights were trained with
            "started_from": meta.get("started_from"),  # another run's stage end this run started after
        }
        text = text_tokenizer(job["shards_uri"], cfg.data.storage_options)  # embedded: the file stands alone
        with staging(cfg, export_path(cfg)) as local:  # a remote workspace: a scratch copy, gone after
            out = export_model(reader, local, metadata, text)
            publish(cfg, out, export_path(cfg))  # on a remote workspace: every node reads it there
            model_info = log_and_register(cfg, out, job, meta)
    version = getattr(model_info, "registered_model_version", None)
    record_lineage(job, cfg.data.storage_options, None if version is None else str(version))
    losses = meta["losses"]
    return {
        "run": run_name(cfg),
        "storage": storage_uri(cfg),
        "checkpoint": str(result.checkpoint.path),
        "stage": meta["stage"],
        "stage_done": meta["done"],
        "global_step": meta["global_step"],
        "workers_last": meta["world"],
        "loss_first": losses[0][2] if losses else None,
        "loss_last": losses[-1][2] if losses else None,
        "loss_curve": losses,
        "resumes": meta["resumes"],
        "started_from": meta.get("started_from"),
        "export": export_path(cfg),
        "mlflow_run_id": job["mlflow_run_id"],
        "registered_model": REGISTERED_NAME if cfg.train.register else None,
        "registered_version": getattr(model_info, "registered_model_version", None),
        **{k: result.metrics[k] for k in RATES if k in (result.metrics or {})},
    }
