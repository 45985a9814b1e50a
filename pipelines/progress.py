"""Progress lines: how a stage says how far it has got, from the driver or from a Ray worker.

A stage prints `[stage] done/total unit, name value, ...` on stderr, for example
`[train] 120/460 steps, loss 0.8302, tokens/s 2496, stage align`. The line reads as it is in
a log or on a terminal, and `uniloom run` parses it back from the stage's log to draw the
stage's bar (pipelines/terminal.py). Ray forwards what a worker prints to the driver, so a
Ray Train worker's lines reach the bar the same way as the driver's own.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

# Searched, not matched from the start: Ray may put the worker's name before a forwarded line.
_LINE = re.compile(
    r"\[(?P<stage>[a-z_]+)\] (?P<done>\d+)/(?P<total>\d+) (?P<unit>[a-z/]+)(?P<figures>(?:, \S+ [^,]+)*)$"
)


@dataclass
class Progress:
    stage: str
    done: int
    total: int
    unit: str  # what is counted: "steps", "shards", "samples"
    figures: dict[str, str] = field(default_factory=dict)  # shown as given: "loss" -> "0.8302"

    def line(self) -> str:
        return f"[{self.stage}] {self.done}/{self.total} {self.unit}" + "".join(
            f", {name} {value}" for name, value in self.figures.items()
        )


def report(stage: str, done: int, total: int, unit: str, figures: dict[str, str] | None = None) -> None:
    """One progress line on stderr. Figure values are formatted by the caller and hold no
    comma; names hold no space ("tokens/s")."""
    sys.stderr.write(Progress(stage, done, total, unit, dict(figures or {})).line() + "\n")
    sys.stderr.flush()


def parse(text: str) -> Progress | None:
    """The progress line in `text` (one line of a log), or None."""
    m = _LINE.search(text.rstrip())
    if m is None:
        return None
    figures = dict(part.split(" ", 1) for part in m["figures"].split(", ")[1:])
    return Progress(m["stage"], int(m["done"]), int(m["total"]), m["unit"], figures)
