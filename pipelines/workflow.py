"""The workflow runner behind `uniloom run`: stages in a fixed order, each skipped when
its fingerprint is unchanged.

A stage's fingerprint hashes the config sections it reads, the fingerprints of the
stages it depends on, and the code it runs (its `run` function and the uniloom modules that
reaches: pipelines/codehash.py), so changing one filter reruns the data stage and what
depends on it, and nothing before it, and editing an evaluation module reruns eval and
what follows only; a stage that runs again (forced, or its outputs gone) reruns its
dependents too. State lives in the workspace (`State`: a local folder or an object
store), written atomically after each stage, so a run that dies keeps every stage it
finished. One MLflow parent run covers an invocation; every stage
that runs gets a nested run, and skipped stages are listed on the parent.

The terminal gets one progress bar per stage; each stage's own output (and Ray's,
DeepSpeed's, MLflow's) goes to `logs/<stage>.log` in this node's scratch folder, the
workspace when that is local (pipelines/terminal.py, pipelines/workspace.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uniloom.pipelines.codehash import Sources
from uniloom.pipelines.config import UniloomConfig, to_dict
from uniloom.pipelines.data.fs import is_local, join, open_fs, store_error, to_uri
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.terminal import Terminal
from uniloom.pipelines.workspace import scratch, workspace_uri


@dataclass
class StageResult:
    """What a stage reports: paths it wrote (must exist for a later skip) and metrics."""

    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections (or dotted keys) the stage reads
    run: Callable[[UniloomConfig, dict[str, StageResult]], StageResult]
    depends: tuple[str, ...] = ()
    description: str = ""


def code_fingerprint(run: Callable, sources: Sources | None = None) -> str:
    """Fingerprint of the code a stage's `run` runs. This runner is left out: it decides
    whether a stage runs, not what the stage computes."""
    return (sources or Sources()).function(run, exclude=(__name__,))[0]


def _select(cfg_dict: dict[str, Any], key: str) -> Any:
    value: Any = cfg_dict
    for part in key.split("."):
        value = value[part]
    return value


def fingerprint(stage: Stage, cfg: UniloomConfig, upstream: dict[str, str], code: str) -> str:
    data = to_dict(cfg)
    payload = {
        "stage": stage.name,
        "config": {key: _select(data, key) for key in stage.sections},
        "upstream": {name: upstream[name] for name in stage.depends},
        "code": code,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class State:
    """Per stage, its fingerprint and last result. On a local disk `<workspace>/workflow.json`,
    replaced by rename. An object store has no atomic rename, so there each write is a new
    version `<workspace>/workflow/<n>.json`, created only where absent (a conditional PUT on
    S3): a version appears whole, and a second run that writes the same workspace fails
    instead of dropping the other's stages. The newest KEEP versions are kept."""

    KEEP = 4

    def __init__(self, workspace: str, storage_options: dict[str, Any] | None = None):
        self.fs, root = open_fs(workspace, storage_options)
        self.local = is_local(self.fs)
        self.storage_options = storage_options
        self.stages: dict[str, dict[str, Any]] = {}
        if self.local:
            self.fs.makedirs(root, exist_ok=True)
            self.path = join(root, "workflow.json")
            raw = self.fs.cat_file(self.path) if self.fs.isfile(self.path) else None
        else:
            self.folder = join(root, "workflow")
            self.versions = sorted(
                int(m[1]) for p in self._list() if (m := re.fullmatch(r"(\d+)\.json", posixpath.basename(p)))
            )
            self.path = self._version(self.versions[-1] if self.versions else 0)
            raw = self.fs.cat_file(self.path) if self.versions else None
        if raw is not None:
            try:
                self.stages = json.loads(raw)["stages"]
            except (ValueError, KeyError):
                raise UniloomError(
                    f"{to_uri(self.fs, self.path)} is corrupt: delete it to rerun every stage"
                ) from None

    def _list(self) -> list[str]:
        try:
            return self.fs.ls(self.folder, detail=False)
        except FileNotFoundError:
            return []

    def _version(self, n: int) -> str:
        return join(self.folder, f"{n:06d}.json")

    def fresh(self, name: str, fp: str) -> StageResult | None:
        """The stored result when the fingerprint matches and every output still exists."""
        entry = self.stages.get(name)
        if not entry or entry["fingerprint"] != fp:
            return None
        result = StageResult(entry["outputs"], entry["metrics"])
        for uri in result.outputs.values():
            fs, path = open_fs(uri, self.storage_options)
            if not fs.exists(path):
                return None
        return result

    def record(self, name: str, fp: str, result: StageResult, seconds: float, run_id: str | None) -> None:
        self.stages[name] = {
            "fingerprint": fp,
            "outputs": result.outputs,
            "metrics": result.metrics,
            "seconds": round(seconds, 2),
            "mlflow_run_id": run_id,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        data = json.dumps({"stages": self.stages}, indent=2, sort_keys=True).encode()
        if self.local:
            self.fs.pipe_file(self.path + ".tmp", data)
            os.replace(self.path + ".tmp", self.path)
            return
        n = (self.versions[-1] if self.versions else 0) + 1
        path = self._version(n)
        try:
            with store_error(self.fs, "write", path):
                self.fs.pipe_file(path, data, mode="create")
        except UniloomError as e:
            if not isinstance(e.__cause__, FileExistsError):
                raise
            raise UniloomError(
                f"{to_uri(self.fs, path)} was written by another run of this workspace meanwhile: "
                "run one `uniloom run` per workspace"
            ) from None
        self.versions.append(n)
        self.path = path
        for old in self.versions[: -self.KEEP]:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._version(old))
        self.versions = self.versions[-self.KEEP :]


@dataclass
class StageReport:
    name: str
    status: str  # "ran" or "skipped"
    seconds: float
    fingerprint: str
    result: StageResult


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def run_workflow(
    cfg: UniloomConfig,
    stages: list[Stage],
    force: tuple[str, ...] = (),
    terminal: Terminal | None = None,
) -> tuple[list[StageReport], str | None]:
    """Run `stages` in order; returns per-stage reports and the MLflow parent run id.
    `terminal`: where the bars go (default: this process's stderr; logs under
    `<workspace>/logs`). A Ray instance the stages started is shut down at the end, its
    last words into the logs."""
    from uniloom.pipelines.tracking import tracking_uri

    tracking_uri(cfg)  # a store other nodes cannot reach fails here, before anything is written
    state = State(workspace_uri(cfg), cfg.data.storage_options)
    terminal = terminal or Terminal(scratch(cfg, "logs"))
    ray_was_up = _ray_up()
    with terminal.captured():
        try:
            return _run_stages(cfg, stages, force, terminal, state)
        finally:
            if not ray_was_up and _ray_up():
                sys.modules["ray"].shutdown()


def _run_stages(
    cfg: UniloomConfig, stages: list[Stage], force: tuple[str, ...], terminal: Terminal, state: State
) -> tuple[list[StageReport], str | None]:
    import mlflow

    from uniloom.pipelines.tracking import configure, log_config

    sources = Sources()
    configure(cfg)
    reports: list[StageReport] = []
    results: dict[str, StageResult] = {}
    fingerprints: dict[str, str] = {}
    ran: set[str] = set()
    # nested under the caller's run where there is one (`bench tokenizers --unified`)
    with mlflow.start_run(
        run_name=f"workflow-{cfg.preset}", nested=mlflow.active_run() is not None,
        tags={"uniloom.workflow": cfg.preset},
    ) as parent:  # fmt: skip
        log_config(cfg)
        for stage in stages:
            fp = fingerprint(stage, cfg, fingerprints, code_fingerprint(stage.run, sources))
            fingerprints[stage.name] = fp
            # A dependency that ran again made new outputs, even with an unchanged config.
            rerun = stage.name in force or any(d in ran for d in stage.depends)
            cached = None if rerun else state.fresh(stage.name, fp)
            if cached is not None:
                terminal.say(f"[{stage.name}] unchanged (fingerprint {fp}): skipped")
                results[stage.name] = cached
                reports.append(StageReport(stage.name, "skipped", 0.0, fp, cached))
                continue
            start = time.perf_counter()
            with terminal.stage(stage.name, stage.description or stage.name):
                with mlflow.start_run(
                    run_name=stage.name, nested=True, tags={"uniloom.stage": stage.name}
                ) as run:
                    mlflow.log_param("fingerprint", fp)
                    result = stage.run(cfg, results)
                    if result.metrics:
                        mlflow.log_metrics(result.metrics)
            seconds = time.perf_counter() - start
            state.record(stage.name, fp, result, seconds, run.info.run_id)
            results[stage.name] = result
            ran.add(stage.name)
            reports.append(StageReport(stage.name, "ran", seconds, fp, result))
        skipped = [r.name for r in reports if r.status == "skipped"]
        mlflow.set_tag("uniloom.skipped_stages", ",".join(skipped) or "none")
    return reports, parent.info.run_id
