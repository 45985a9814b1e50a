"""`uniloom ui`: the MLflow UI over the workspace's tracking store, on 127.0.0.1 only.

MLflow's own server (`mlflow server`) runs as a child process with its output in
<workspace>/logs/ui.log; the URL is printed once the UI answers, and stopping `uniloom ui`
(Ctrl-C, SIGTERM) stops the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click

from uniloom.pipelines.commands.options import config_options
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.redact import redact_text
from uniloom.pipelines.tracking import tracking_uri

HOST = "127.0.0.1"
DEFAULT_PORT = 5000
START_TIMEOUT_S = 300  # `mlflow server` takes tens of seconds to start on a busy machine
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _local_store(uri: str) -> Path | None:
    """The file or folder of a SQLite or file store, else None (MLflow checks the others)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    if uri.startswith("file:"):
        return Path(uri[len("file:") :].removeprefix("//"))
    return None


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(empty)"


@click.command()
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help=f"Port on {HOST} [default: {DEFAULT_PORT} if free, else a free one].",
)
@click.option(
    "--workspace", type=click.Path(file_okay=False), help="Workspace directory [config: workspace]."
)
@config_options
def ui(port: int | None, workspace: str | None, cfg) -> None:
    """The MLflow UI over the workspace's runs and registered models, on 127.0.0.1 only.
    Prints its URL and serves until stopped (Ctrl-C)."""
    if workspace:
        cfg.workspace = workspace
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        click.echo(f"MLflow UI at {redact_text(uri)} (tracking.tracking_uri, a server: nothing to start)")
        return
    store = _local_store(uri)
    if store is not None and not store.exists():
        raise UniloomError(
            f"no MLflow store at {store}: nothing has run in workspace {cfg.workspace} yet "
            "(`uniloom run` makes one), or pass --workspace"
        )
    if port is None:
        port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port()
    elif not _port_free(port):
        raise UniloomError(f"port {port} on {HOST} is in use: choose another with --port")
    serve(uri, port, Path(cfg.workspace).resolve())


def serve(uri: str, port: int, workspace: Path) -> None:
    """Run `mlflow server` over store `uri` on HOST:port until it or this process is stopped."""
    log_path = workspace / "logs" / "ui.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{HOST}:{port}"
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": uri,  # not on the command line, where `ps` shows credentials
        # Server-side jobs (GenAI scorers) are not needed to browse runs; they start more processes.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
               "--artifacts-destination", str(workspace / "mlartifacts")]  # fmt: skip
    click.echo(f"starting the MLflow UI over {redact_text(uri)} (log: {log_path})", err=True)
    with log_path.open("w") as log:
        # Its own session: a Ctrl-C reaches it once, forwarded from here, not twice.
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    stopping = False

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        if _wait_until_up(proc, url, lambda: stopping):
            click.echo(f"MLflow UI at {url}")
            click.echo("Ctrl-C stops it", err=True)
        code = proc.wait()
        if code != 0 and not stopping:
            raise UniloomError(
                f"the MLflow server exited with code {code}: {_last_line(log_path)} (log: {log_path})"
            )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # this process failed: leave no server behind
            proc.terminate()
            proc.wait(timeout=30)


def _wait_until_up(proc: subprocess.Popen, url: str, stopping) -> bool:
    """True once the server answers its health check; False if it was stopped first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    while proc.poll() is None and not stopping():
        try:
            with direct.open(f"{url}/health", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise UniloomError(f"the MLflow server did not answer at {url} within {START_TIMEOUT_S} s")
        time.sleep(0.5)
    return False
