"""A real MLflow tracking server on loopback for tests: MLflow's own Flask app over a
SQLite store and a local artifact folder, behind basic auth.

`mlflow server` takes tens of seconds to start on a loaded machine (uvicorn, the job
executor); this serves the same tracking and artifact handlers from one process with
werkzeug. Every request must carry the given user and password, so a client that
reaches it is known to have sent them.
"""

from __future__ import annotations

import base64
import os
import select
import subprocess
import sys
from pathlib import Path


class MlflowServer:
    def __init__(self, root: Path, user: str, password: str):
        self.root, self.user, self.password = root, user, password
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def uri(self, user: str | None = None, password: str | None = None) -> str:
        return f"http://{user or self.user}:{password or self.password}@127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.root), self.user],
            env={**os.environ, "TEST_MLFLOW_PASSWORD": self.password, "MLFLOW_DISABLE_TELEMETRY": "true"},
            stdout=subprocess.PIPE,
            stderr=open(self.root / "server.log", "wb"),  # noqa: SIM115 (kept open by the child)
            text=True,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""  # the port, once the store is ready
        if not line.strip().isdigit():
            self.stop()
            log = (self.root / "server.log").read_text()
            raise RuntimeError(f"MLflow server did not start: {log[-2000:]}")
        self.port = int(line)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _serve(root: Path, user: str, password: str) -> None:
    import mlflow.server as server
    from mlflow.server.handlers import initialize_backend_stores
    from werkzeug.serving import make_server

    store = f"sqlite:///{root / 'mlflow.db'}"
    os.environ[server.BACKEND_STORE_URI_ENV_VAR] = store
    os.environ[server.ARTIFACT_ROOT_ENV_VAR] = "mlflow-artifacts:/"
    os.environ[server.ARTIFACTS_DESTINATION_ENV_VAR] = str(root / "artifacts")
    os.environ[server.SERVE_ARTIFACTS_ENV_VAR] = "true"
    initialize_backend_stores(store, store, "mlflow-artifacts:/")
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def app(environ, start_response):
        if environ.get("HTTP_AUTHORIZATION") != expected:
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="test"')])
            return [b"unauthorized"]
        return server.app(environ, start_response)

    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    print(httpd.server_port, flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), sys.argv[2], os.environ["TEST_MLFLOW_PASSWORD"])
