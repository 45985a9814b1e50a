"""A real two-node Ray cluster on this machine with every server on loopback.

`ray start` swaps 127.0.0.1 for the interface address: on the head,
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps it on loopback, but the CLI then refuses to
start a second node. The worker node is therefore started through this file's
`worker` entry point, which runs the same `ray start` with Ray's node-IP lookup pinned
to 127.0.0.1. Every agent gets its own free port (a second Ray instance on the machine
holds the defaults). Both `ray start` calls run in sessions of their own, and the
cluster's processes are found and stopped by PID through those session ids (Ray's agents
rename themselves over their command line and environment, and outlive their raylet when
it is killed first), so other Ray instances on the machine are untouched.

With `private` folders (e.g. /tmp and /dev/shm), every worker node runs in a mount
namespace of its own (`unshare --mount --propagation private`, as root) where each of
them is an empty tmpfs: the worker node and the head share no file there, as nodes of a
real cluster share no disk. Their network is one, so the worker node still reaches the
head and every server on 127.0.0.1. It reads Ray's token from RAY_AUTH_TOKEN, since the
token file may lie in a hidden folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, root: Path, cpus_per_node: int = 1, private: tuple[str, ...] = ()):
        self.root = root
        self.private = private
        self.temp_dir = Path(f"/tmp/ul-{secrets.token_hex(3)}")  # short: unix socket paths
        self.token_path = root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.cpus = cpus_per_node
        self.sessions: set[int] = set()
        self.workers: list[int] = []  # the worker nodes' sessions, oldest first
        inherited = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        self.env = {
            **inherited,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ports(self) -> list[str]:
        return [
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        ]  # fmt: skip

    def start(self, timeout: float = 120) -> LocalCluster:
        head = [
            str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", f"--num-cpus={self.cpus}",
            f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *self._ports(),
        ]  # fmt: skip
        env = {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self._start(head, env)
        self._wait(lambda: len(self.alive_node_ids()) == 1, timeout, "the head node")
        self.start_worker(timeout)
        return self

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not condition():
            if time.time() > deadline:
                raise RuntimeError(f"{what} did not come up within {timeout} s")
            time.sleep(1)

    def start_worker(self, timeout: float = 120) -> None:
        """Start one more worker node and wait until the GCS counts it alive."""
        worker = [
            sys.executable, __file__, "worker", f"--address=127.0.0.1:{self.gcs_port}",
            "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}", "--disable-usage-stats", *self._ports(),
        ]  # fmt: skip
        env = self.env
        if self.private:
            mounts = " && ".join(f"mount -t tmpfs uniloom-node {shlex.quote(d)}" for d in self.private)
            worker = ["unshare", "--mount", "--propagation", "private", "--",
                      "sh", "-c", f'{mounts} && exec "$@"', "sh", *worker]  # fmt: skip
            env = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
            env["RAY_AUTH_TOKEN"] = self.token_path.read_text()
        before = self.alive_node_ids()
        self.workers.append(self._start(worker, env))
        self._wait(lambda: self.alive_node_ids() - before, timeout, "the worker node")

    def kill_worker(self) -> None:
        """SIGKILL every process of the newest worker node (raylet, agents, its Ray workers):
        the node is lost as a machine is, with no chance to clean up."""
        session = self.workers.pop()
        for pid in self.pids({session}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while self.pids({session}) and time.time() < deadline:
            time.sleep(0.2)

    def _start(self, cmd: list[str], env: dict[str, str]) -> int:
        """Run a `ray start` in a session of its own; its session id."""
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.sessions.add(proc.pid)
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{out.decode(errors='replace')}")
        return proc.pid

    def alive_node_ids(self) -> set[str]:
        out = subprocess.run(
            [str(BIN / "ray"), "list", "nodes", f"--address=127.0.0.1:{self.gcs_port}", "--filter", "state=ALIVE", "--format=json"],
            env={**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return {n["node_id"] for n in json.loads(out.stdout)} if out.returncode == 0 else set()

    def pids(self, sessions: set[int] | None = None) -> list[int]:
        """PIDs of the cluster's processes (of `sessions` only, when given)."""
        sessions = self.sessions if sessions is None else sessions
        out = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp session ...
            if fields[0] != "Z" and int(fields[3]) in sessions:
                out.append(int(proc.name))
        return [p for p in out if p != os.getpid()]

    def listening_addresses(self) -> set[str]:
        """Local addresses of every TCP socket this cluster's processes listen on."""
        pids = set(self.pids())
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        found = set()
        for line in out.splitlines():
            fields = line.split()
            if any(f"pid={p}," in line for p in pids):
                found.add(fields[3].rsplit(":", 1)[0])
        return found

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 10
            while self.pids() and time.time() < deadline:
                time.sleep(0.2)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    import ray._private.services as services

    services.get_node_ip_address = lambda address=None: "127.0.0.1"
    from ray.scripts.scripts import main

    sys.argv = ["ray", "start", *sys.argv[2:]]
    main()
