"""What `uniloom run` shows a person: one progress bar per stage, while everything the
stage prints (ours, Ray's, DeepSpeed's, MLflow's) goes to `<workspace>/logs/<stage>.log`.

Output is caught at the file descriptors: while a stage runs, the process's stdout and
stderr point at the stage's log. So C++ logs (Ray's core worker), Python warnings and
logging, child processes, and what Ray's log monitor forwards from Ray Train and Ray Data
workers (printed by the driver) all land there. Between stages they point at
`logs/workflow.log`. A thread follows the stage's log and draws the bar from the stage's
progress lines (pipelines/progress.py). On a terminal the bar is redrawn in place;
otherwise it is a plain line at the start, at each quarter and at the end.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from uniloom.pipelines.progress import Progress, parse
from uniloom.pipelines.redact import redact_text

TAIL_LINES = 20  # of a failed stage's log, shown on the terminal
_WIDTH = 20  # characters of the drawn bar


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class Bar:
    """One stage's line: items done of total, the rate, the stage's figures (loss,
    tokens/s), the ETA. `live`: redrawn in place; else plain lines, one per quarter."""

    def __init__(self, out: TextIO, stage: str, description: str, live: bool, quarters: bool = True):
        self.out, self.stage, self.description, self.live, self.quarters = (
            out,
            stage,
            description,
            live,
            quarters,
        )
        self.started = time.monotonic()
        self.last: Progress | None = None
        self.first: tuple[float, int] | None = None  # (time, done) of the first update
        self.updated = self.started  # time of the last update
        self.quarter = 0
        if live:
            self.draw()
        else:
            self._line(f"[{stage}] {description}")

    def update(self, progress: Progress) -> None:
        self.updated = time.monotonic()
        if self.first is None:
            self.first = (self.updated, progress.done)
        self.last = progress
        if self.live:
            self.draw()
        elif self.quarters and progress.total:
            quarter = min(4 * progress.done // progress.total, 3)
            if quarter > self.quarter:
                self.quarter = quarter
                self._line(self.text())

    def tick(self) -> None:
        """Redraw (the elapsed time moves on between updates)."""
        if self.live:
            self.draw()

    def rate(self) -> float | None:
        """Items per second between the first and the last update (a stage spends its first
        seconds starting Ray and loading data); from the stage's start while those are
        less than a second apart."""
        if self.first is None or self.last is None:
            return None
        seconds, items = self.updated - self.first[0], self.last.done - self.first[1]
        if seconds < 1:
            seconds, items = self.updated - self.started, self.last.done
        return items / seconds if seconds > 0 and items > 0 else None

    def text(self) -> str:
        p, elapsed = self.last, duration(time.monotonic() - self.started)
        if p is None:
            return f"[{self.stage}] {self.description} ({elapsed})"
        rate = self.rate()
        parts = [f"{p.done}/{p.total} {p.unit}"]
        if rate:
            parts.append(f"{rate:.{0 if rate >= 100 else 1 if rate >= 10 else 2}f} {p.unit}/s")
        parts += [f"{name} {value}" for name, value in p.figures.items()]
        if rate and p.total > p.done:  # counting down between updates
            left = (p.total - p.done) / rate - (time.monotonic() - self.updated)
            parts.append(f"ETA {duration(max(left, 0))}")
        if self.live:
            filled = _WIDTH * min(p.done, p.total) // max(p.total, 1)
            return f"[{self.stage}] [{'#' * filled}{'.' * (_WIDTH - filled)}] {elapsed} " + ", ".join(parts)
        return f"[{self.stage}] {100 * p.done // max(p.total, 1)}% " + ", ".join(parts)

    def draw(self) -> None:
        try:
            width = os.get_terminal_size(self.out.fileno()).columns or 100  # 0: a terminal that does not say
        except (OSError, ValueError):
            width = 100
        self.out.write("\r" + redact_text(self.text())[: width - 1] + "\x1b[K")
        self.out.flush()

    def close(self, seconds: float, failed: bool = False) -> None:
        text = f"[{self.stage}] {'failed after' if failed else 'done in'} {seconds:.1f} s"
        if self.last is not None:  # its last progress line, without the stage's name
            text += f" ({self.last.line().split('] ', 1)[1]})"
        if self.live:
            self.out.write("\r" + redact_text(text) + "\x1b[K\n")
            self.out.flush()
        else:
            self._line(text)

    def _line(self, text: str) -> None:
        self.out.write(redact_text(text) + "\n")
        self.out.flush()


class Follower(threading.Thread):
    """Reads a stage's log as it grows: progress lines update the bar; with `echo`
    (--verbose) every line is copied there too."""

    def __init__(self, path: Path, stage: str, bar: Bar, echo: TextIO | None):
        super().__init__(name=f"uniloom-log-{stage}", daemon=True)
        self.file = open(path, "rb")  # noqa: SIM115 (closed by stop)
        self.stage, self.bar, self.echo = stage, bar, echo
        self.partial = b""
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.25):
            self.read()
            self.bar.tick()
        self.read()

    def read(self) -> None:
        data = self.file.read()
        if not data:
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            text = raw.decode(errors="replace")
            if self.echo is not None:
                self.echo.write(redact_text(text) + "\n")
                self.echo.flush()
            progress = parse(text)
            if progress is not None and progress.stage == self.stage:
                self.bar.update(progress)

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.file.close()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _settle(path: Path, quiet_s: float = 0.5, most_s: float = 3.0) -> None:
    """Ray's log monitor forwards its workers' last lines after the stage's code returns:
    while Ray runs, wait until the log has been quiet for `quiet_s` (at most `most_s`)."""
    _flush()
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    deadline, size = time.monotonic() + most_s, path.stat().st_size
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        size, before = path.stat().st_size, size
        if size == before:
            return


def _point(path: Path, truncate: bool = False) -> None:
    """This process's stdout and stderr (file descriptors 1 and 2) to `path`."""
    _flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0), 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class Terminal:
    """The person's view of a workflow: `out` (default: the stderr this process started
    with) gets the bars and `say`'s lines; the rest goes to the logs under `logs`."""

    def __init__(self, logs: Path, verbose: bool = False, out: TextIO | None = None):
        self.logs, self.verbose = Path(logs), verbose
        if out is None:
            _flush()
            out = os.fdopen(os.dup(2), "w", buffering=1, errors="replace")
        self.out = out
        self.live = not verbose and out.isatty() and os.environ.get("TERM") != "dumb"

    def say(self, line: str) -> None:
        self.out.write(redact_text(line) + "\n")
        self.out.flush()

    @contextlib.contextmanager
    def captured(self) -> Iterator[Terminal]:
        """For the whole workflow: stdout and stderr into `logs/workflow.log` between
        stages, and back where they were at the end."""
        self.logs.mkdir(parents=True, exist_ok=True)
        _flush()
        saved, streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
        try:
            _point(self.logs / "workflow.log", truncate=True)
            # Python's streams write to the descriptors too, even where something had
            # replaced them (a redirect_stdout, a test runner's capture).
            sys.stdout = open(1, "w", buffering=1, errors="replace", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, errors="replace", closefd=False)  # noqa: SIM115
            yield self
        finally:
            _flush()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])

    @contextlib.contextmanager
    def stage(self, name: str, description: str) -> Iterator[Bar]:
        """A stage's run (inside `captured`): its output into `logs/<name>.log`, its bar
        on the terminal, and when it fails, the log's last lines and its path."""
        path = self.logs / f"{name}.log"
        _point(path, truncate=True)
        bar = Bar(self.out, name, description, self.live, quarters=not self.verbose)
        follower = Follower(path, name, bar, self.out if self.verbose else None)
        follower.start()
        started = time.monotonic()
        try:
            yield bar
        except BaseException:
            _flush()
            follower.stop()
            bar.close(time.monotonic() - started, failed=True)
            self._tail(name, path)
            raise
        else:
            _settle(path)
            follower.stop()
            bar.close(time.monotonic() - started)
        finally:
            _point(self.logs / "workflow.log")

    def _tail(self, name: str, path: Path) -> None:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        tail = lines[-TAIL_LINES:]
        self.say(f"[{name}] the last {len(tail)} lines of its log {path}:")
        for line in tail:
            self.say(f"  {line[:300]}")
