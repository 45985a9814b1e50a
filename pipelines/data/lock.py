"""One data run per output: a lease object `<output>/_lock.json` that names its owner (run
id, host, pid) and when it expires. The run creates it before it reads the manifest, a
thread renews it while the run lasts, every commit first checks that it is still the
owner, and the run deletes it at the end. A lease whose owner is gone (expired, or held by
a dead process on this host) is taken over with a warning; a live one fails the second
run with an error naming its owner.

Creating the lease is exclusive where the filesystem can say so: local files appear by
link(2), which fails if the name exists; fsspec filesystems get `pipe_file(mode="create")`,
a conditional PUT (If-None-Match) on S3 and an exists-then-write elsewhere. In both cases the
lease is read back after SETTLE_S, and a run that no longer finds its own id there stops.
Limits on stores without a conditional create (and on any store during a takeover, which
deletes the stale lease first): two runs whose check and write interleave within SETTLE_S
can both read their own lease; the next renewal or commit check of the overwritten one then
fails it. Expiry is wall-clock time, so hosts sharing an output need clocks in sync to well
under TTL_S.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from typing import Any

from uniloom.pipelines.data.fs import is_local, join, open_fs, store_error, to_uri
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.process import alive

LOCK = "_lock.json"
TTL_S = 60.0  # a crashed run's output is free this long after its last renewal
RENEW_S = TTL_S / 4
SETTLE_S = 1.0  # object stores only: the pause before reading a new lease back


class OutputLock:
    def __init__(self, out: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.root = open_fs(out, storage_options)
        self.path = join(self.root, LOCK)
        self.uri = to_uri(self.fs, self.path)
        self.local = is_local(self.fs)
        self.id = uuid.uuid4().hex
        self.lost: str | None = None  # why the lease is no longer ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the lease record

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "owner": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "renewed": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
            "expires": now + TTL_S,
        }

    def _read(self) -> dict[str, Any] | None:
        """The lease as stored; None when there is none."""
        with store_error(self.fs, "read", self.path):
            try:
                raw = self.fs.cat_file(self.path)
            except FileNotFoundError:
                return None
        try:
            lease = json.loads(raw)
            if not isinstance(lease, dict) or not {"owner", "host", "pid", "expires"} <= lease.keys():
                raise ValueError("missing owner, host, pid or expires")
            return lease
        except ValueError as e:
            raise UniloomError(
                f"{self.uri} is not a lease of `uniloom data run` ({e}): remove it if no run is writing here"
            ) from None

    @staticmethod
    def describe(lease: dict[str, Any]) -> str:
        left = lease["expires"] - time.time()
        when = f"expires in {left:.0f} s" if left > 0 else f"expired {-left:.0f} s ago"
        return f"run {lease['owner'][:12]} on host {lease['host']}, pid {lease['pid']} (lease {when})"

    @staticmethod
    def stale(lease: dict[str, Any]) -> str | None:
        """Why the lease's owner is gone, or None while it may still be running."""
        if lease["expires"] < time.time():
            return "its lease expired"
        if lease["host"] == socket.gethostname() and not alive(int(lease["pid"])):
            return "its process is gone"
        return None

    # ------------------------------------------------------------------ create, renew, drop

    def _create(self, data: bytes) -> bool:
        """Write the lease if no lease exists; False if one does."""
        with store_error(self.fs, "write", self.path):
            if not self.local:
                self.fs.makedirs(self.root, exist_ok=True)
                try:
                    self.fs.pipe_file(self.path, data, mode="create")
                except FileExistsError:
                    return False
                return True
            os.makedirs(self.root, exist_ok=True)
            tmp = f"{self.path}.{self.id}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.link(tmp, self.path)  # appears whole, and only if the name is free
                return True
            except FileExistsError:
                return False
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def _write(self, data: bytes) -> None:
        with store_error(self.fs, "write", self.path):
            if not self.local:
                self.fs.pipe_file(self.path, data)
                return
            tmp = f"{self.path}.{self.id}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)

    def acquire(self) -> OutputLock:
        for _ in range(3):  # a takeover that loses a race looks again
            if self._create(json.dumps(self._record()).encode()):
                self._confirm()
                self._thread = threading.Thread(target=self._renew_loop, name="uniloom-lease", daemon=True)
                self._thread.start()
                return self
            lease = self._read()
            if lease is None:
                continue  # released between our create and our read
            why = self._refuse_live(lease)
            warnings.warn(
                f"taking over {self.uri} from {self.describe(lease)}: {why}", RuntimeWarning, stacklevel=2
            )
            self._drop_if(lease["owner"])
        raise UniloomError(f"could not take {self.uri}: other runs keep replacing it")

    def _refuse_live(self, lease: dict[str, Any]) -> str:
        """Why `lease` may be taken over; raises the busy error while its owner may run."""
        why = self.stale(lease)
        if why is None:
            raise UniloomError(
                f"{to_uri(self.fs, self.root)} is being written by another `uniloom data run`: "
                f"{self.describe(lease)}. Wait for it to finish; if that run is gone, remove {self.uri}"
            )
        return why

    def check_free(self) -> None:
        """Raise the busy error if a live run holds the output (a preflight: takes nothing)."""
        lease = self._read()
        if lease is not None:
            self._refuse_live(lease)

    def _confirm(self) -> None:
        if not self.local:
            time.sleep(SETTLE_S)
        lease = self._read()
        if lease is None or lease["owner"] != self.id:
            holder = self.describe(lease) if lease else "a run that has since released it"
            raise UniloomError(f"lost {self.uri} to {holder} while taking it: rerun when that run ends")

    def _drop_if(self, owner: str) -> None:
        """Delete the lease if `owner` still holds it (a stale one, taken over)."""
        if self.local:
            aside = f"{self.path}.{self.id}.stale"
            try:
                os.rename(self.path, aside)  # only one of several takers gets a given lease
            except FileNotFoundError:
                return
            with open(aside, "rb") as f:
                taken = json.loads(f.read())
            if taken.get("owner") != owner:  # a new owner's, not the stale one: put it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass  # a third run holds it now; that owner's checks find it out
            os.unlink(aside)
            return
        lease = self._read()
        if lease is not None and lease["owner"] == owner:
            self.fs.rm(self.path)

    def check(self) -> None:
        """Raise unless the lease is still ours: before each commit."""
        if self.lost is None:
            lease = self._read()
            if lease is None or lease["owner"] != self.id:
                self.lost = f"taken by {self.describe(lease)}" if lease else "deleted"
        if self.lost:
            raise UniloomError(
                f"this run no longer holds {self.uri} ({self.lost}): stopped before committing"
            )

    def _renew_loop(self) -> None:
        failing_since = None
        while not self._stop.wait(RENEW_S):
            try:
                lease = self._read()
                if lease is None or lease["owner"] != self.id:
                    self.lost = f"taken by {self.describe(lease)}" if lease else "deleted"
                    return
                self._write(json.dumps(self._record()).encode())
                failing_since = None
            except Exception as e:  # a store that is down for a moment: retry until the lease ends
                failing_since = failing_since or time.time()
                if time.time() - failing_since > TTL_S - RENEW_S:
                    self.lost = f"could not renew it for {TTL_S:.0f} s: {e}"
                    return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.lost is None:
            try:
                lease = self._read()
            except UniloomError:
                return
            if lease is not None and lease["owner"] == self.id:
                self.fs.rm(self.path)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
