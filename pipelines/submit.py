"""Submit a uniloom command to a Ray cluster as a Ray Job.

The project's three code folders are staged as one `uniloom` package and uploaded with
the job (runtime_env py_modules), so the job's driver and workers import exactly this
checkout, whatever the cluster's image has installed. Logs stream back until the job
ends, and the exit status is the job's; or, without waiting, the call returns once the
job is submitted and says how to follow it.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import yaml

from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.redact import redact_argv, redact_text

CODE_FOLDERS = ("pipelines", "models", "kernels")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def auth_token(token_path: str | None = None) -> str | None:
    """Ray's token auth: explicit path, then RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if token_path:
        path = Path(token_path)
        if not path.is_file():
            raise UniloomError(f"token file {path} does not exist")
        return path.read_text().strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text().strip()
    return None


def stage_package(dest: Path) -> Path:
    """Copy pipelines/, models/, kernels/ of the installed uniloom into dest/uniloom."""
    import uniloom.pipelines

    root = Path(uniloom.pipelines.__file__).resolve().parent.parent
    package = dest / "uniloom"
    package.mkdir(parents=True)
    for folder in CODE_FOLDERS:
        shutil.copytree(root / folder, package / folder, ignore=_IGNORE)
    return package


def load_runtime_env(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise UniloomError(f"runtime env file {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UniloomError(f"runtime env file {file}: not a YAML file ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UniloomError(f"runtime env file {file}: expected a mapping")
    return data


def _client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # the SDK raises ConnectionError, RuntimeError or ValueError
        raise UniloomError(f"cannot reach the Ray job server at {address}: {e}") from None


# A job server answers before its node's agent is up (a freshly started head, or a busy
# one); the server itself says to try again later, so we do, for a bounded time.
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S = 120


def _submit_when_ready(client, entrypoint: str, runtime_env: dict[str, Any]) -> str:
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if AGENT_NOT_READY not in str(e):
                raise UniloomError(f"job submission refused: {e}") from None
            if time.monotonic() > deadline:
                raise UniloomError(f"no Ray job agent became available within {AGENT_WAIT_S} s") from None
            time.sleep(2)


async def _stream_logs(client, job_id: str, echo) -> None:
    async for chunk in client.tail_job_logs(job_id):
        echo(chunk, nl=False)


def follow_hint(address: str, job_id: str, token_path: str | None, token: str | None) -> list[str]:
    """Ray CLI commands that follow or stop the job (they need the token in their
    environment when the cluster has token auth)."""
    env = ""
    if token:
        env = "RAY_AUTH_MODE=token "
        env += f"RAY_AUTH_TOKEN_PATH={shlex.quote(token_path)} " if token_path else ""
    where = f"--address {shlex.quote(redact_text(address))} {job_id}"
    return [f"follow it: {env}ray job logs --follow {where}", f"stop it:   {env}ray job stop {where}"]


def submit(
    address: str,
    command: list[str],
    runtime_env_file: str | None = None,
    token_path: str | None = None,
    echo=click.echo,
    wait: bool = True,
) -> tuple[str, str]:
    """Submit `uniloom <command>`; returns (job id, status name). With `wait`, logs
    stream until the job ends and the status is the final one; without, the call returns
    right after submission with the job's status then (PENDING, usually)."""
    if not command:
        raise UniloomError("nothing to submit: give the uniloom command after `--`")
    token = auth_token(token_path)
    runtime_env = load_runtime_env(runtime_env_file)  # a bad file fails before any connection
    client = _client(address, token)
    env_vars = {"MLFLOW_DISABLE_TELEMETRY": "true", **runtime_env.pop("env_vars", {})}
    with tempfile.TemporaryDirectory(prefix="uniloom-submit-") as tmp:
        package = stage_package(Path(tmp))
        runtime_env = {
            **runtime_env,
            "py_modules": [str(package), *runtime_env.get("py_modules", [])],
            "env_vars": env_vars,
        }
        entrypoint = " ".join(["python", "-m", "uniloom.pipelines.cli", *map(shlex.quote, command)])
        job_id = _submit_when_ready(client, entrypoint, runtime_env)
    shown = " ".join(["python", "-m", "uniloom.pipelines.cli", *map(shlex.quote, redact_argv(command))])
    echo(f"submitted job {job_id}: {shown}")
    if not wait:
        for line in follow_hint(address, job_id, token_path, token):
            echo(line)
        return job_id, client.get_job_status(job_id).value
    asyncio.run(_stream_logs(client, job_id, echo))
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(1)
        status = client.get_job_status(job_id)
    return job_id, status.value
