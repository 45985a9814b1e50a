"""MLflow set-up shared by every stage: where the store is, failing fast when a remote
tracking server is unreachable, and runs nested under the workflow's parent run. What
reaches MLflow from here (params, tags, error messages) has its secrets redacted."""

from __future__ import annotations

import base64
import contextlib
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uniloom.pipelines.config import UniloomConfig, flatten, to_dict
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.redact import redact, redact_text

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(cfg: UniloomConfig) -> str:
    """The configured URI, or a SQLite store inside the workspace (the embedded default)."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    db = Path(cfg.workspace).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


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
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(cfg.workspace).resolve() / "mlartifacts").as_uri()
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


@contextlib.contextmanager
def stage_run(cfg: UniloomConfig, name: str, tags: dict[str, Any] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage: nested under the active (workflow) run if there is
    one, else a top-level run. Logs the config as params."""
    import mlflow

    configure(cfg)
    nested = mlflow.active_run() is not None
    tags = {"uniloom.stage": name, **redact(tags or {})}
    with mlflow.start_run(run_name=name, nested=nested, tags=tags) as run:
        log_config(cfg)
        yield run
