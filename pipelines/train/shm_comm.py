"""Collectives over shared memory for the ranks of a process group that share one machine.

Gloo moves every all-to-all through loopback TCP: about 0.85 ms for 1,000 rows of 128
floats between two processes here, and a training step of the tiny preset makes twenty
of them (the counts, dispatch and return exchanges of four MoE layers, forward and
backward), besides its gradient all-reduce (5.5 ms for 1.8M floats). Ranks on one
machine can instead read each other's memory: each rank owns an outbox in /dev/shm that
the others map, and a control block of per-rank counters says when an outbox is full and
when it has been read. The same exchange then costs a copy in and a copy out.

`ShmChannel.open(group)` is collective over the group (it uses the group itself, through
gloo, to agree on names and to check that every rank can map the same memory) and returns
None on every rank when they cannot: ranks on different machines, or machines whose
memory model this module does not cover (x86-64 only: stores become visible in program
order, so a counter written after the data is never seen before it). Each collective
afterwards is:

    wait until every peer has read my outbox of the previous call  (counter CONSUMED)
    copy my data into my outbox; bump ARRIVED                       (grow the outbox first
                                                                     when it is too small)
    for each peer: wait for its ARRIVED, check that it called the same collective,
                   copy my part out of its outbox
    bump CONSUMED

A waiting rank spins briefly, then yields its core (sched_yield) so that other work on
the machine (Ray Data's readers) runs meanwhile, and after SLEEP_AFTER_S sleeps between
polls (a long wait: another rank is checkpointing or evaluating). It checks every second
that its peers' processes are alive: a dead peer raises an error where gloo would have
raised one (Ray Train then restarts the group), never a silent hang; so does a peer
that waits for this rank in another channel of this process (the ranks issued their
collectives in different orders: each would wait for the other forever), and a peer
that does not come within timeout_s; each error names the collective, its sequence
number, the channel and every rank's counters. A rank that arrives at a different
collective (another kind, an all-reduce of another size, an all-to-all whose splits
disagree with this rank's) is an error too, instead of wrong bits. Files are unlinked
as soon as every peer has mapped them: a killed process leaves nothing in /dev/shm
(except an outbox it grew in its very last collective).
"""

from __future__ import annotations

import math
import mmap
import os
import platform
import secrets
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.process import alive

SHM_DIR = Path("/dev/shm")
ARRIVED, REDUCED, CONSUMED, GEN, CAPACITY, PID, NONCE, OP, SIZE = range(9)
HEADER = 9  # int64 columns before the R + 1 outbox offsets
COUNTERS = {ARRIVED: "ARRIVED", REDUCED: "REDUCED", CONSUMED: "CONSUMED"}
OPS = ("all_to_all_single", "all_reduce_")  # column OP holds 1 + the index of the call
SPIN = 200  # busy polls before a waiting rank starts yielding its core
SLEEP_AFTER_S, SLEEP_S = 0.02, 0.0005  # then, after this long, it sleeps this long per poll
LIVENESS_S = 1.0  # how often a waiting rank checks that its peers still exist


def _supported() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64") and SHM_DIR.is_dir()


class _Mapped:
    """A file in /dev/shm mapped shared, as bytes (`u8`) for torch."""

    def __init__(self, path: Path, size: int | None = None):
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if size is not None else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if size is not None:
                os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.u8 = torch.frombuffer(self.mm, dtype=torch.uint8)


class ShmChannel:
    """All-to-all and sum all-reduce among the ranks of `group`, through shared memory."""

    def __init__(self, group, name: str, ctrl: _Mapped, initial_bytes: int, timeout_s: float):
        self.name, self.timeout_s = name, timeout_s
        self.R, self.me = dist.get_world_size(group), dist.get_rank(group)
        self.peers = [j for j in range(self.R) if j != self.me]
        self.ctrl = np.frombuffer(ctrl.mm, dtype=np.int64).reshape(self.R, -1)  # (R, stride); keeps the map
        self.seq, self.op = 0, ""  # the last collective called on this channel
        self.outbox: list[_Mapped | None] = [None] * self.R  # mine and the peers' mapped outboxes
        self.gens = [-1] * self.R
        self._unlink_after: tuple[int, Path] | None = None  # (seq, path) of a grown outbox
        self._grow(initial_bytes, publish=True)
        self.ctrl[self.me, PID] = os.getpid()
        _OPEN.add(self)

    # -- setup -------------------------------------------------------------------------

    @classmethod
    def open(cls, group, initial_bytes: int = 4 << 20, timeout_s: float = 1800.0) -> ShmChannel | None:
        """Collective over `group`: a channel on every rank, or None on every rank."""
        R, me = dist.get_world_size(group), dist.get_rank(group)
        if R < 2:
            return None
        stride = -(-(HEADER + R + 1) // 8) * 8  # a rank's counters fill whole cache lines
        info = [None]
        if me == 0 and _supported():
            name = f"uniloom-shm-{os.getpid()}-{secrets.token_hex(6)}"
            nonce = secrets.randbits(62)
            try:
                ctrl = _Mapped(SHM_DIR / name, R * stride * 8)
                np.frombuffer(ctrl.mm, dtype=np.int64)[NONCE] = nonce
                info = [(name, nonce)]
            except OSError:
                pass
        dist.broadcast_object_list(info, src=dist.get_global_rank(group, 0), group=group)
        channel, ok = None, False
        if info[0] is not None and _supported():
            name, nonce = info[0]
            try:
                mapped = ctrl if me == 0 else _Mapped(SHM_DIR / name)
                if int(np.frombuffer(mapped.mm, dtype=np.int64)[NONCE]) == nonce:
                    channel, ok = cls(group, name, mapped, initial_bytes, timeout_s), True
            except OSError:
                pass
        ok = _all(ok, group)
        if ok:  # everyone made its outbox: map the peers'
            try:
                pids = [int(channel.ctrl[j, PID]) for j in range(R)]
                ok = all(Path(f"/proc/{p}").exists() for p in pids)  # one pid namespace
                for j in channel.peers:
                    channel._map_peer(j)
            except OSError:
                ok = False
            ok = _all(ok, group)
        if channel is not None:  # every rank has mapped what it needs (or given up)
            channel._outbox_path(me, channel.gens[me]).unlink(missing_ok=True)
            if me == 0:
                (SHM_DIR / name).unlink(missing_ok=True)
        if not ok and channel is not None:
            channel.close()
            channel = None
        return channel

    def _outbox_path(self, rank: int, gen: int) -> Path:
        return SHM_DIR / f"{self.name}-r{rank}-g{gen}"

    def _grow(self, nbytes: int, publish: bool = False) -> None:
        gen = self.gens[self.me] + 1
        capacity = max(nbytes, 2 * int(self.ctrl[self.me, CAPACITY]))
        capacity = -(-capacity // mmap.PAGESIZE) * mmap.PAGESIZE
        path = self._outbox_path(self.me, gen)
        self.outbox[self.me], self.gens[self.me] = _Mapped(path, capacity), gen
        self.ctrl[self.me, CAPACITY] = capacity
        self.ctrl[self.me, GEN] = gen
        if not publish:  # peers map it during this call; unlink it once they have all read
            self._unlink_after = (self.seq, path)

    def _map_peer(self, j: int) -> None:
        gen = int(self.ctrl[j, GEN])
        if gen != self.gens[j]:
            self.outbox[j], self.gens[j] = _Mapped(self._outbox_path(j, gen)), gen

    def close(self) -> None:
        self.outbox = [None] * self.R
        self.ctrl = None
        _OPEN.discard(self)

    # -- waiting -----------------------------------------------------------------------

    def _wait(self, col: int, value: int, peers: list[int] | None = None) -> None:
        """Until counter `col` of every peer (or of `peers`) reaches `value`."""
        ctrl, peers = self.ctrl, self.peers if peers is None else peers
        spins, started, deadline, check = 0, 0.0, None, 0.0
        while True:
            if all(ctrl[j, col] >= value for j in peers):
                return
            spins += 1
            if spins < SPIN:
                continue
            now = time.monotonic()
            if deadline is None:
                started, deadline, check = now, now + self.timeout_s, now + LIVENESS_S
            if now - started > SLEEP_AFTER_S:
                time.sleep(SLEEP_S)
            else:
                os.sched_yield()
            if now > check:
                check = now + LIVENESS_S
                late = [j for j in peers if ctrl[j, col] < value]
                for j in late:
                    if not alive(int(ctrl[j, PID])):
                        self._fail(f"rank {j} of the group (pid {int(ctrl[j, PID])}) exited")
                    self._check_order(j, col, value)
                if now > deadline:
                    self._fail(
                        f"ranks {late} did not bring {COUNTERS[col]} to #{value} in {self.timeout_s:.0f} s"
                    )

    def _check_order(self, j: int, col: int, value: int) -> None:
        """Fail when peer j, which has not brought counter `col` to `value` here, has
        started a collective in another channel of this process that this rank has not: j
        waits there for this rank, which waits here for j. A process calls its collectives
        from one thread (the training loop's), so this rank cannot get there before this
        wait ends: the ranks called them in different orders."""
        pid = int(self.ctrl[j, PID])
        for other in list(_OPEN):
            rows = [k for k in other.peers if int(other.ctrl[k, PID]) == pid] if other is not self else []
            # There first, then here again: j may have done its part here and gone on since
            # the caller looked (x86-64 loads are not reordered, so j's stores here, made
            # before it arrived there, are seen).
            if rows and other.ctrl[rows[0], ARRIVED] > other.seq and self.ctrl[j, col] < value:
                k = rows[0]
                self._fail(
                    f"rank {j} (pid {pid}) waits for this rank in {OPS[int(other.ctrl[k, OP]) - 1]} "
                    f"#{int(other.ctrl[k, ARRIVED])} on channel {other.name}, where this rank's last was "
                    f"{other.op or 'none'} #{other.seq}: the ranks call their collectives in different orders"
                )

    def _check_peer(self, j: int) -> None:
        """Peer j, arrived at this collective, called the same one (and an all-reduce of
        the same size)."""
        op, size = int(self.ctrl[j, OP]), int(self.ctrl[j, SIZE])
        if OPS[op - 1] != self.op or (self.op == "all_reduce_" and size != self.ctrl[self.me, SIZE]):
            self._fail(
                f"rank {j} called {OPS[op - 1]} of {size} bytes where this rank called {self.op} of "
                f"{int(self.ctrl[self.me, SIZE])} bytes: the ranks call their collectives in different orders"
            )

    def _fail(self, reason: str) -> None:
        """Raise, naming this collective and every rank's counters; the channel is closed
        (a peer may be halfway through the collective)."""
        ctrl, me = self.ctrl, self.me
        state = "; ".join(
            f"rank {j}{' (this one)' if j == me else ''} pid {int(ctrl[j, PID])} last arrived at "
            f"{OPS[int(ctrl[j, OP]) - 1] if ctrl[j, OP] else 'none'} #{int(ctrl[j, ARRIVED])}, "
            f"reduced #{int(ctrl[j, REDUCED])}, consumed #{int(ctrl[j, CONSUMED])}"
            for j in range(self.R)
        )
        where = f"shared-memory {self.op} #{self.seq} on channel {self.name}, rank {me} of {self.R}"
        self.close()
        raise UniloomError(f"{where}: {reason} ({state})")

    def _begin(self, op: str, nbytes: int) -> torch.Tensor:
        """Start collective `op`: wait until my outbox is free, grow it if needed; its
        first nbytes."""
        if self.ctrl is None:
            raise UniloomError(f"shared-memory channel {self.name} is closed (a collective on it failed)")
        self.op, self.seq = op, self.seq + 1
        self._wait(CONSUMED, self.seq - 1)
        if self._unlink_after is not None and self._unlink_after[0] < self.seq:
            self._unlink_after[1].unlink(missing_ok=True)
            self._unlink_after = None
        if nbytes > int(self.ctrl[self.me, CAPACITY]):
            self._grow(nbytes)
        self.ctrl[self.me, OP], self.ctrl[self.me, SIZE] = OPS.index(op) + 1, nbytes
        return self.outbox[self.me].u8[:nbytes]

    def _peer_bytes(self, j: int) -> torch.Tensor:
        self._map_peer(j)
        return self.outbox[j].u8

    # -- collectives -------------------------------------------------------------------

    def all_to_all_single(
        self, out: torch.Tensor, x: torch.Tensor, out_splits: list[int], in_splits: list[int]
    ):
        """dist.all_to_all_single(out, x, out_splits, in_splits) on contiguous tensors:
        rows in_splits[j] of x go to rank j; out receives out_splits[j] rows from rank j."""
        row = math.prod(x.shape[1:]) * x.element_size()  # bytes
        box = self._begin("all_to_all_single", x.numel() * x.element_size())
        box.copy_(x.reshape(-1).view(torch.uint8))
        bounds = np.cumsum([0, *in_splits]) * row  # bytes bounds[r]:bounds[r + 1] go to rank r
        self.ctrl[self.me, HEADER : HEADER + self.R + 1] = bounds
        self.ctrl[self.me, ARRIVED] = self.seq
        out_bytes = out.reshape(-1).view(torch.uint8)
        starts = np.cumsum([0, *out_splits[:-1]]) * row
        mine = out_bytes[starts[self.me] : starts[self.me] + out_splits[self.me] * row]
        mine.copy_(box[bounds[self.me] : bounds[self.me + 1]])
        for k in range(1, self.R):  # start with the next rank: the ranks read different outboxes
            j = (self.me + k) % self.R
            n = out_splits[j] * row
            self._wait(ARRIVED, self.seq, [j])
            self._check_peer(j)
            lo, hi = int(self.ctrl[j, HEADER + self.me]), int(self.ctrl[j, HEADER + self.me + 1])
            if hi - lo != n:
                self._fail(
                    f"rank {j} sends this rank {hi - lo} bytes, {out_splits[j]} rows of {row} bytes expected"
                )
            out_bytes[starts[j] : starts[j] + n].copy_(self._peer_bytes(j)[lo:hi])
        self.ctrl[self.me, CONSUMED] = self.seq

    def all_reduce_(self, tensors: list[torch.Tensor], scale: float = 1.0) -> None:
        """Sum over the ranks (times `scale`), in place, of contiguous tensors of one
        dtype, as if they were one flat tensor (the outbox is that flat buffer: no flatten
        or unflatten copies beside it). Rank r adds up chunk r of every rank's
        contribution, in rank order, and the others copy that chunk: every rank ends with
        the same bits."""
        dtype, flats = tensors[0].dtype, [t.view(-1) for t in tensors]
        total = sum(f.numel() for f in flats)
        box = self._begin("all_reduce_", total * tensors[0].element_size()).view(dtype)
        torch.cat(flats, out=box)
        self.ctrl[self.me, ARRIVED] = self.seq
        self._wait(ARRIVED, self.seq)
        for j in self.peers:
            self._check_peer(j)
        bounds = [total * j // self.R for j in range(self.R + 1)]  # chunk j: rank j adds it up
        a, b = bounds[self.me], bounds[self.me + 1]
        parts = [self._peer_bytes(j).view(dtype)[a:b] for j in range(self.R)]
        mine = parts[self.me]
        acc = torch.add(parts[0], parts[1], out=mine if self.me < 2 else None)  # elementwise: may alias
        for p in parts[2:]:
            acc.add_(p)
        if scale != 1.0:
            acc.mul_(scale)
        if acc is not mine:
            mine.copy_(acc)
        self.ctrl[self.me, REDUCED] = self.seq
        self._wait(REDUCED, self.seq)
        starts = np.cumsum([0, *(f.numel() for f in flats)])
        for j in range(self.R):
            a, b = bounds[j], bounds[j + 1]
            chunk = self._peer_bytes(j).view(dtype)
            for f, s in zip(flats, starts):
                lo, hi = max(a, s), min(b, s + f.numel())
                if lo < hi:
                    f[lo - s : hi - s].copy_(chunk[lo:hi])
        self.ctrl[self.me, CONSUMED] = self.seq


def _all(flag: bool, group) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


_CHANNELS: dict[int, tuple[object, ShmChannel | None]] = {}
# This process's open channels, whichever way opened: a wait in one checks the others for
# a peer waiting there for this rank (ShmChannel._check_order). Weak: a dropped channel leaves.
_OPEN: weakref.WeakSet[ShmChannel] = weakref.WeakSet()


def channel(group) -> ShmChannel | None:
    """The channel of `group` (opened on first use: collective over the group), or None
    when its ranks cannot share memory. One per process group object, kept with it."""
    key = id(group)
    if key not in _CHANNELS or _CHANNELS[key][0] is not group:
        _CHANNELS[key] = (group, ShmChannel.open(group))
    return _CHANNELS[key][1]
