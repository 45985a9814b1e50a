"""Shared fixtures. `report` collects figures a test measured and prints them in the
terminal summary, so numbers like the detector's accuracy under noise are visible in
every `make test` log without being assertions on timing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels (kernels/) run in Triton's CPU interpreter where no GPU launches them; it
# is read when a kernel is defined, so before any test imports one.
if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
UNILOOM = str(Path(sys.executable).with_name("uniloom"))
_REPORTS: list[str] = []


@pytest.fixture
def report(request):
    def add(line: str) -> None:
        _REPORTS.append(f"{request.node.nodeid}: {line}")

    return add


@pytest.fixture(scope="session")
def s3_server():
    """Storage options for a moto S3 server on 127.0.0.1, one per session: each test file
    makes a bucket of its own."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"key": "testing", "secret": "testing", "endpoint_url": f"http://{host}:{port}"}
    server.stop()


def pytest_terminal_summary(terminalreporter):
    if _REPORTS:
        terminalreporter.section("measured figures")
        for line in _REPORTS:
            terminalreporter.write_line(line)


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, prefix: tuple[str, ...] = (), timeout=600
):
    """Run the installed `uniloom` console script; returns the CompletedProcess."""
    return subprocess.run(
        [*prefix, UNILOOM, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session, the embedded default's (on loopback), 2 CPUs."""
    from uniloom.pipelines.config import RayConfig
    from uniloom.pipelines.raycluster import init_ray

    ray = init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()
