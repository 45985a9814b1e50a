"""Which float precision a stage computes in: `precision: auto | fp32 | bf16` of the
tokenizer, data and train sections (and inference).

"auto" is bf16 on CUDA. On a CPU it is bf16 only where bf16 autocast is measured faster
than fp32 on this machine: with native bf16 (avx512_bf16, AMX) it can be, while on an
AVX2-only CPU autocast emulates it and a 128->512 Linear's forward and backward take 39 ms
against 7.6 ms in fp32 (and on this project's avx512_bf16 machine fp32 still wins at these
widths: 9.4 against 12.8 ms). The timing takes about a second, in one thread, and is
cached per machine (CPU model and bf16 flags, torch version) in
$UNILOOM_CACHE_DIR/precision.json (default ~/.cache/uniloom), so a machine measures once;
delete its entry to measure again.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
BF16_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16")  # the CPU flags that decide bf16 speed
CACHE_ENV = "UNILOOM_CACHE_DIR"
BF16_MARGIN = 0.9  # bf16 is chosen where it takes under 90% of fp32's time


@dataclass
class Timing:
    """One machine's measurement: milliseconds per forward + backward, best of the repeats."""

    fp32_ms: float
    bf16_ms: float
    measured: str  # ISO date and time, UTC

    @property
    def choice(self) -> str:
        # bf16 must win by a margin: within timing noise the exact precision is kept
        return "bf16" if self.bf16_ms < BF16_MARGIN * self.fp32_ms else "fp32"

    def describe(self) -> str:
        if self.choice == "bf16":
            speed = f"bf16 {self.fp32_ms / self.bf16_ms:.1f}x faster"
        else:
            speed = f"bf16 {self.bf16_ms / self.fp32_ms:.1f}x slower"
        return f"cpu: {speed}, measured {self.measured}"


def measure(repeats: int = 20) -> Timing:
    """Times a 128->512 Linear + GELU + Linear, forward and backward on 1,024 rows, in fp32
    and under bf16 autocast, alternating so that other load on the machine hits both alike.
    The best of `repeats` of each counts. One thread: what decides the ratio is the
    instruction set, and a multi-threaded timing on a machine where other processes hold
    cores swings either way (seen here: bf16 1.2x faster at 2 threads under load, 1.6x
    slower on the idle machine, 1.4x slower at one thread either way)."""
    generator = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Linear(512, 128))
    x = torch.randn(1024, 128, generator=generator)  # (rows, 128)

    def once(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = net(x)  # (rows, 128)
        y.float().square().mean().backward()
        return time.perf_counter() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for bf16 in (False, True):  # first calls pick kernels and allocate
            once(bf16)
        best = {False: float("inf"), True: float("inf")}
        for _ in range(repeats):
            for bf16 in (False, True):
                best[bf16] = min(best[bf16], once(bf16))
    finally:
        torch.set_num_threads(threads)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return Timing(round(best[False] * 1e3, 3), round(best[True] * 1e3, 3), now)


def _cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, flags) from /proc/cpuinfo; elsewhere the platform's processor name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines()) if v
    )
    return fields.get("model name", platform.machine()), set(fields.get("flags", "").split())


def machine_key() -> str:
    """What the CPU measurement depends on: CPU model, bf16 flags, torch."""
    model, flags = _cpuinfo()
    present = ",".join(f for f in BF16_FLAGS if f in flags) or "none"
    return f"{model} | {present} | torch {torch.__version__}"


def cache_file() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "uniloom"
    return Path(root) / "precision.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or half-written by a killed process: measure again
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, timing: Timing) -> None:
    """Adds this machine's entry; a private temporary file and a rename, because several
    processes (the data stage's encoder actors) may measure at once. An unwritable cache
    only costs a measurement in the next process."""
    entries = _read_cache(path)
    entries[key] = asdict(timing)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


# Per process: the CPU timing is taken (or read) and logged once per machine key, not at
# every call (a training step asks again and again).
_TIMINGS: dict[str, Timing] = {}


def cpu_timing() -> Timing:
    """This machine's fp32 / bf16 timing: this process's, the cache's, or measured now."""
    key = machine_key()
    if key in _TIMINGS:
        return _TIMINGS[key]
    path = cache_file()
    entry = _read_cache(path).get(key)
    try:
        timing = Timing(**entry) if isinstance(entry, dict) else None
    except TypeError:  # an entry written by another version of this module
        timing = None
    if timing is None:
        timing = measure()
        _write_cache(path, key, timing)
    _TIMINGS[key] = timing
    print(f"precision auto -> {timing.choice} ({timing.describe()})", file=sys.stderr, flush=True)
    return timing


def resolve(precision: str, device) -> str:
    """The precision `precision` ("auto", "fp32" or "bf16") means on `device` (a
    torch.device or its name): "fp32" or "bf16". Explicit values are kept; "auto" is bf16
    on CUDA, on a CPU what the measurement says, and fp32 on anything else."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16"
    return cpu_timing().choice if kind == "cpu" else "fp32"


def autocast(precision: str, device):
    """bf16 autocast on `device` where `precision` resolves to bf16; a no-op otherwise.
    Weights, optimiser state and the ops autocast keeps in fp32 stay fp32."""
    device = torch.device(device)
    if resolve(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def tags(stage: str, precision: str, device) -> dict[str, str]:
    """What to record in MLflow for `stage`: the precision it runs in, the one asked for
    and, for "auto" on a CPU, the measurement behind the choice. Tags rather than params:
    a worker restarted on another machine may choose differently in the same run."""
    chosen = resolve(precision, device)
    out = {f"precision.{stage}": chosen, f"precision.{stage}.requested": precision}
    if precision == "auto" and torch.device(device).type == "cpu":
        out[f"precision.{stage}.reason"] = cpu_timing().describe()
    return out
