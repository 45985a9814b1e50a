"""Shared fixtures. `report` collects figures a test measured and prints them in the
terminal summary, so numbers like the detector's accuracy under noise are visible in
every `make test` log without being assertions on timing."""

from __future__ import annotations

import http.client
import http.server
import os
import subprocess
import sys
import threading
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


class S3Faults:
    """An HTTP proxy on 127.0.0.1 in front of the moto server that answers chosen requests
    with an S3 error instead of forwarding them: object-store faults through the real
    client stack (s3fs, aiobotocore and their retries), nothing of it replaced."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.rule: tuple[str, str, int, str] | None = None  # method, path part, status, code
        self.left: int | None = None  # faults still to answer; None: every match
        self.failed = 0  # requests answered with the fault
        self.lock = threading.Lock()
        handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, method: str, path_part: str, status: int, code: str, times: int | None = None) -> None:
        with self.lock:
            self.rule, self.left, self.failed = (method, path_part, status, code), times, 0

    def clear(self) -> None:
        with self.lock:
            self.rule = None

    def fault(self, method: str, path: str) -> tuple[int, str] | None:
        with self.lock:
            rule = self.rule
            if rule is None or method != rule[0] or rule[1] not in path or self.left == 0:
                return None
            if self.left is not None:
                self.left -= 1
            self.failed += 1
            return rule[2], rule[3]


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the S3 client expects
    proxy: S3Faults
    HOP = ("connection", "transfer-encoding", "content-length", "expect")

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            return body
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in self.HOP or (self.command == "HEAD" and key.lower() == "content-length"):
                self.send_header(key, value)  # a HEAD answer's length is the object's
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _any(self) -> None:
        body = self._body()
        if fault := self.proxy.fault(self.command, self.path):
            status, code = fault
            xml = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected {code}</Message></Error>"
            self._reply(status, [("Content-Type", "application/xml")], xml.encode())
            return
        conn = http.client.HTTPConnection(self.proxy.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self.HOP}
        conn.request(
            self.command, self.path, body=body, headers={**headers, "Content-Length": str(len(body))}
        )
        response = conn.getresponse()
        self._reply(response.status, response.getheaders(), response.read())
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any


@pytest.fixture
def s3_faults(s3_server):
    """(storage options, S3Faults): the session's moto server reached through a proxy that
    fails nothing until told to."""
    faults = S3Faults(s3_server["endpoint_url"])
    yield {**s3_server, "endpoint_url": faults.endpoint}, faults
    faults.server.shutdown()
    faults.server.server_close()


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


@pytest.fixture
def uniloom_main(monkeypatch, capsys):
    """Run `uniloom ARGS...` in this process through the console script's main() (its
    one-line error handling included): (exit code, stdout, stderr). Fast, where a
    subprocess would import torch and MLflow again."""
    from uniloom.pipelines.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["uniloom", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def one_torch_thread():
    """Small models and ops run fastest on one intra-op thread, and a shared 2-core machine
    makes OpenMP's spinning threads stall each other (tens of times slower): pin to one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
