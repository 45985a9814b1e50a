"""MLflow set-up shared by every stage: where the store is, failing fast when a remote
tracking server is unreachable, and runs nested under the workflow's parent run. What
reaches MLflow from here (params, tags, error messages) has its secrets redacted.

A server that fails once a stage's run is going does not stop the stage: MLflow retries
each request with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR: 7 retries over
about four minutes by default), and a call that still fails is dropped and reported at the
stage's end (RunLog). The stage's work (shards, checkpoints) is worth more than its record.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from uniloom.pipelines.config import UniloomConfig, flatten, to_dict
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.redact import redact, redact_text
from uniloom.pipelines.workspace import is_remote, workspace_uri

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
log = logging.getLogger(__name__)
PAUSE_S = 60.0  # after a call failed past MLflow's retries: calls skipped this long, doubling
PAUSE_MAX_S = 600.0


def tracking_uri(cfg: UniloomConfig) -> str:
    """The configured URI, or a SQLite store inside a local workspace (the embedded
    default). A remote workspace's nodes share no disk, so its store is the tracking server
    the user gives (tracking.tracking_uri, else MLFLOW_TRACKING_URI); one on this node's
    files is refused."""
    if not is_remote(cfg.workspace):
        return cfg.tracking.tracking_uri or f"sqlite:///{workspace_uri(cfg, 'mlflow.db')}"
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if urllib.parse.urlsplit(uri).scheme.lower() in ("", "file", "sqlite"):
        store = (
            f"the MLflow store {redact_text(uri)} is"
            if uri
            else "no MLflow tracking server is given, so the store would be"
        )
        raise UniloomError(
            f"workspace {redact_text(cfg.workspace)} is remote, but {store} a file on this node, which "
            "the other nodes cannot reach: set MLFLOW_TRACKING_URI (or tracking.tracking_uri) to a "
            "tracking server, e.g. the one in infra/mlflow/mlflow.yaml"
        )
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A remote server must answer its health check within `timeout` seconds. Userinfo
    in the URI (`https://user:password@host`) is sent as basic auth, as MLflow sends it."""
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    request = urllib.request.Request(
        parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/") + "/health"
    )
    if parts.username is not None:
        userinfo = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(userinfo.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            resp.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = redact_text(str(getattr(e, "reason", e)))
        raise UniloomError(f"MLflow tracking server {redact_text(uri)} is unreachable: {reason}") from None


def use_tracking_uri(uri: str) -> None:
    """`mlflow.set_tracking_uri`, and no "View run at <uri>" links printed by MLflow
    when the URI holds credentials (it prints the URI whole)."""
    import mlflow

    if redact_text(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)


def configure(cfg: UniloomConfig) -> str:
    """Point MLflow at the store and experiment of `cfg`; returns the experiment id."""
    import mlflow

    uri = tracking_uri(cfg)
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(cfg.workspace).mkdir(parents=True, exist_ok=True)
    use_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # Ray workers and subprocesses inherit it
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        artifacts = None  # a tracking server's default, for a local workspace
        if uri.startswith("sqlite:///"):
            artifacts = Path(workspace_uri(cfg, "mlartifacts")).as_uri()
        elif is_remote(cfg.workspace):  # on the workspace's store, which every node reaches
            artifacts = workspace_uri(cfg, "mlartifacts")
        experiment_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def pinned_requirements(*names: str) -> list[str]:
    """`name==installed version` for a logged model's pip_requirements (explicit pins
    spare MLflow its ~20 s dependency inference per model)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in names]


def log_config(cfg: UniloomConfig) -> None:
    """The flattened config, secrets redacted, as run params (MLflow caps a value at
    6000 characters)."""
    import mlflow

    params = {k: str(v)[:6000] for k, v in flatten(redact(to_dict(cfg))).items()}
    keys = sorted(params)
    for i in range(0, len(keys), 100):
        mlflow.log_params({k: params[k] for k in keys[i : i + 100]})


class RunLog:
    """The logging calls of a run that is already going: `log(what, fn, *args)` calls
    `fn`, and if it fails (after MLflow's own retries) records `what` as lost and goes on.
    Once a call has failed, calls are skipped for PAUSE_S, then PAUSE_S doubled up to
    PAUSE_MAX_S, so that a server that stays down costs the stage one wait for MLflow's
    retries, not one per call; a call that succeeds ends the pause. `end` ends the run,
    paused or not."""

    def __init__(self, uri: str):
        self.uri = redact_text(uri)
        self.lost: list[str] = []
        self.error = ""  # the last failure
        self._pause, self._until = PAUSE_S, 0.0

    def __call__(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        if time.monotonic() < self._until:
            self.lost.append(what)
            return False
        return self._call(what, fn, *args, **kwargs)

    def end(self, status: str = "FINISHED") -> None:
        """End the active run, even during a pause: MLflow forgets a run in this process
        only through end_run (which drops it before it calls the server), and a run left
        active would be the parent of the next stage's run."""
        import mlflow

        self._call("the run's end", mlflow.end_run, status)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # only MLflow's calls run here: whatever fails is the store's
            self.error = f"{e.__class__.__name__}: {redact_text(str(e))[:300]}"
            self.lost.append(what)
            log.warning(
                "MLflow tracking server %s failed (%s); the run goes on without it", self.uri, self.error
            )
            self._until = time.monotonic() + self._pause
            self._pause = min(2 * self._pause, PAUSE_MAX_S)
            return False
        self._pause, self._until = PAUSE_S, 0.0
        return True

    def report(self) -> str | None:
        """One line on what never reached the store, or None when everything did."""
        if not self.lost:
            return None
        more = f" and {len(self.lost) - 3} more" if len(self.lost) > 3 else ""
        return (
            f"MLflow tracking server {self.uri} failed during the run ({self.error}); "
            f"not logged: {', '.join(self.lost[:3])}{more}"
        )


class RunLogger:
    """Logging into a run that is already going, by its id, from any process: a Ray Train
    worker (rank 0; `active` False on the others makes every call a no-op) or the driver.
    Every call goes through a RunLog: a tracking server that fails mid-run costs records,
    never training; `close` ends the run and reports what was lost. MLflow's system
    metrics are sampled while the handle is open."""

    def __init__(self, uri: str, run_id: str, active: bool = True):
        self.active = active and bool(run_id)
        self.log = RunLog(uri)
        if self.active:
            import mlflow

            use_tracking_uri(uri)
            mlflow.start_run(run_id=run_id, log_system_metrics=True)

    def metrics(self, values: dict[str, Any], step: int) -> None:
        """Numbers only: keys starting with `_` are the caller's, not MLflow's."""
        if self.active:
            import mlflow

            values = {k: float(v) for k, v in values.items() if not k.startswith("_")}
            self.log(f"metrics at step {step}", mlflow.log_metrics, values, step=step)

    def tags(self, values: dict[str, str]) -> None:
        if self.active:
            import mlflow

            self.log("tags", mlflow.set_tags, redact(values))

    def image(self, image: Any, path: str) -> None:
        """A PIL image or an (H, W[, C]) uint8 array at artifact `path`."""
        if self.active:
            import mlflow

            self.log(path, mlflow.log_image, image, path)

    def dict(self, values: dict[str, Any], path: str) -> None:
        if self.active:
            import mlflow

            self.log(path, mlflow.log_dict, values, path)

    def close(self) -> None:
        if self.active:
            import sys

            self.log.end()
            if lost := self.log.report():
                print(f"warning: {lost}", file=sys.stderr, flush=True)


def log_dataset(run_id: str, name: str, uri: str, digest: str, counts: dict[str, int]) -> None:
    """The run's training input as an MLflow dataset: where it is (credentials redacted),
    its fingerprint as the digest, and its counts (rows, shards) as the input's tags."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    uri = redact_text(uri)
    # MLflow registers its local source twice and warns that a path is ambiguous: pick it.
    local = "://" not in uri or uri.startswith("file://")
    sources = [s for s in get_registered_sources() if local and s._get_source_type() == "local"]
    source = sources[0].from_dict({"uri": uri}) if sources else resolve_dataset_source(uri)
    dataset = MetaDataset(source, name=name, digest=digest)
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, "training")] + [InputTag(k, str(v)) for k, v in counts.items()]
    mlflow_client().log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), tags)])


def describe_version(name: str, version: str, tags: dict[str, str], description: str | None = None) -> None:
    """Tags (and a description) on a registered model version."""
    client = mlflow_client()
    for key, value in redact(tags).items():
        client.set_model_version_tag(name, version, key, value)
    if description is not None:
        client.update_model_version(name, version, description=redact_text(description))


def mlflow_client():
    import mlflow

    return mlflow.MlflowClient()


@contextlib.contextmanager
def stage_run(
    cfg: UniloomConfig, name: str, tags: dict[str, Any] | None = None, log: RunLog | None = None
) -> Iterator[Any]:
    """An MLflow run for one stage: nested under the active (workflow) run if there is
    one, else a top-level run. Logs the config as params. The run is started while the
    server is known to answer (a failure here is the stage's); it is ended through `log`,
    the caller's RunLog if it logs through one, so a server gone mid-run does not fail a
    stage that has done its work."""
    import mlflow

    configure(cfg)
    log = log or RunLog(tracking_uri(cfg))
    nested = mlflow.active_run() is not None
    tags = {"uniloom.stage": name, **redact(tags or {})}
    run = mlflow.start_run(run_name=name, nested=nested, tags=tags)
    status = "FAILED"
    try:
        log_config(cfg)
        yield run
        status = "FINISHED"
    finally:
        log.end(status)
