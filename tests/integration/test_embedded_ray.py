"""The embedded default's Ray (no address configured): every server it starts listens on
loopback only."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DRIVER = """
import ray
from uniloom.pipelines.config import RayConfig
from uniloom.pipelines.raycluster import init_ray

init_ray(RayConfig(num_cpus=1))
print(ray.get(ray.remote(num_cpus=0.5)(lambda: 1).remote()), flush=True)
input()  # the test looks at the sockets now
ray.shutdown()
"""


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


def test_embedded_ray_listens_on_loopback_only():
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)  # fmt: skip
    try:
        assert driver.stdout.readline().strip() == "1"
        pids = _descendants(driver.pid)
        lines = subprocess.run(
            ["ss", "-ltnpH"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        ours = [line.split()[3] for line in lines if any(f"pid={p}," in line for p in pids)]
        driver.communicate("\n", timeout=60)
    finally:
        driver.kill()
    assert len(ours) >= 3  # GCS, raylet, workers
    assert all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for a in ours), ours
