"""`uniloom ui`: MLflow's UI over the workspace's store, on 127.0.0.1 only, stopped by PID."""

import json
import select
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from localcluster import free_port

pytestmark = pytest.mark.integration
UNILOOM = str(Path(sys.executable).with_name("uniloom"))


def _listening(port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on `port`."""
    rows = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [row.split()[3] for row in rows if row.split()[3].rsplit(":", 1)[-1] == str(port)]


def test_ui_serves_the_workspace_store_on_loopback_and_stops_by_pid(tmp_path):
    import mlflow

    ws = tmp_path / "ws"
    ws.mkdir()
    mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").create_experiment("seen-in-the-ui")
    port = free_port()
    proc = subprocess.Popen([UNILOOM, "ui", "--workspace", str(ws), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)  # the URL, once the UI answers
        line = proc.stdout.readline() if ready else ""
        url = f"http://127.0.0.1:{port}"
        assert line.strip() == f"MLflow UI at {url}", (line, proc.poll())
        with urllib.request.urlopen(url) as page:
            status, html = page.status, page.read().decode()
        assert status == 200 and "<title>MLflow</title>" in html
        with urllib.request.urlopen(f"{url}/ajax-api/2.0/mlflow/experiments/search?max_results=10") as r:
            names = {e["name"] for e in json.load(r)["experiments"]}
        assert "seen-in-the-ui" in names  # this workspace's store, not another
        assert _listening(port) == [f"127.0.0.1:{port}"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert _listening(port) == []  # the server went with it
    assert (ws / "logs" / "ui.log").is_file()
