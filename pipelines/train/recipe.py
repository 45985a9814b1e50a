"""The recipe: the preset's stages in order, and where a run stands in it.

`uniloom train --recipe` runs every stage, each starting from the previous stage's final
checkpoint (weights only: a stage brings its own trainable set, optimizer and schedule);
`--stage N` runs stage N alone, from stage N-1's final checkpoint. A run is resumable as
a whole: rerunning it (same run name and storage) continues from its latest checkpoint,
mid-stage (optimizer, schedule, step, data position, loss curve) or at the next stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train.config import TrainConfig


def select(t: TrainConfig, stage: int | None) -> list[str]:
    """Stage names to run: all of them, or the N-th (1-based)."""
    names = list(t.stages)
    if stage is None:
        return names
    if not 1 <= stage <= len(names):
        raise UniloomError(f"--stage {stage}: the recipe has stages 1..{len(names)} ({', '.join(names)})")
    return [names[stage - 1]]


def global_step(t: TrainConfig, name: str, step: int) -> int:
    """Steps since the start of the recipe: the x axis of every metric."""
    names = list(t.stages)
    return sum(t.stages[n].steps for n in names[: names.index(name)]) + step


@dataclass
class Resume:
    todo: list[str] = field(default_factory=list)  # stages this run will train, in order
    meta: dict[str, Any] | None = None  # the checkpoint's meta.json to start from, None: fresh weights
    mid_stage: bool = False  # continue todo[0] (optimizer, schedule, step) rather than start it
    step: int = 0
    losses: list = field(default_factory=list)  # the loss curve so far: [global_step, stage, loss]
    reader: Any = None  # the worker's checkpoint.Reader of that checkpoint
    resumes: list = field(default_factory=list)  # every restart so far: {global_step, workers}

    @classmethod
    def from_stage_end(cls, reader) -> Resume:
        return cls(
            meta=reader.meta, losses=reader.meta["losses"], reader=reader, resumes=reader.meta["resumes"]
        )

    def describe(self) -> str:
        if self.meta is None:
            return "from scratch"
        m = self.meta
        at = f"stage {m['stage']} step {m['step']} ({m['world']} workers)"
        if not self.todo:
            return f"nothing to train: the run is past the requested stages (at {at})"
        return f"{'continuing' if self.mid_stage else 'starting ' + self.todo[0] + ' after'} {at}"


def plan_resume(
    t: TrainConfig, requested: list[str], meta: dict[str, Any] | None, job: dict[str, Any]
) -> Resume:
    """What to train given the meta.json of the run's latest checkpoint (or None)."""
    names = list(t.stages)
    if meta is None:
        first = names.index(requested[0])
        if first > 0:
            raise UniloomError(
                f"stage {first + 1} ({requested[0]}) starts from the end of stage {first} "
                f"({names[first - 1]}); run `uniloom train --stage {first}` first, or `--recipe`"
            )
        return Resume(todo=list(requested))
    check_compatible(meta, job, names)
    # Done is judged by the config's step count: raising a finished stage's steps
    # continues it (optimizer and all) rather than starting the next one.
    done = meta["step"] >= t.stages[meta["stage"]].steps
    current = names.index(meta["stage"]) + (1 if done else 0)
    todo = [n for n in requested if names.index(n) >= current]
    if todo and names.index(todo[0]) != current:
        raise UniloomError(
            f"the run stands at stage {current + 1} ({names[current]}); stages run in order "
            f"(`uniloom train --stage {current + 1}` or `--recipe`)"
        )
    mid = bool(todo) and not done and todo[0] == meta["stage"]
    return Resume(todo, meta, mid, meta["step"] if mid else 0, meta["losses"], resumes=list(meta["resumes"]))


def check_compatible(meta: dict[str, Any], job: dict[str, Any], names: list[str]) -> None:
    if meta["recipe"] != names:
        raise UniloomError(f"the run was trained with stages {meta['recipe']}, the config has {names}")
    for key in ("image_tokenizer", "text_tokenizer"):
        if meta[key] != job[key]:
            raise UniloomError(
                f"the run's checkpoints were trained on shards of {key.replace('_', ' ')} {meta[key]}, "
                f"these shards have {job[key]}: use another train.run_name"
            )


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints


def latest_meta(fs, run_dir: str) -> dict[str, Any] | None:
    """meta.json of the checkpoint Ray Train will restore: the latest one its checkpoint
    manager registered (a directory being uploaded when a run died is not one)."""
    snapshot = f"{run_dir}/{RAY_SNAPSHOT}"
    if not fs.exists(snapshot):
        return None
    latest = json.loads(fs.cat_file(snapshot)).get("latest_checkpoint_result")
    if not latest:
        return None
    return json.loads(fs.cat_file(f"{run_dir}/{latest['checkpoint_dir_name']}/meta.json"))
