"""What each field of a sample is for: its image, caption and JSON, and its edit chain,
found by the names in `data.columns` (pipelines/data/config.py; first present wins).

Edit samples are read as the public editing sets lay them out:

  webdataset   `{key}.src.jpg` (source), `{key}.tgt.jpg` (target), `{key}.txt` (instruction);
               or a `{key}.json` naming them: {"instruction": ..., "target": "tgt.jpg"}, and
               for several rounds {"edits": [{"instruction": ..., "target": "tgt0.png"}, ...]},
               where a target names another member of the sample by its field
  Parquet, HF  columns `source_image`, `edited_image`, `instruction`; several rounds: a column
               `edits` holding [{instruction, target}] (a list of structs, or the struct of
               lists that Hugging Face's Sequence of a dict stores)

Round r's instruction applies to round r - 1's target (round 0's to the source image). An
edit sample needs no caption: editing sets rarely have one. A field serves one role, and an
edit sample's instruction is found before its caption, so `{key}.txt` beside a target is the
instruction and without one the caption. An edit sample missing an instruction or a target
is quarantined with the round that lacks it: a chain is trained whole.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from uniloom.pipelines.data.config import ColumnsConfig


@dataclass
class Fields:
    """One sample as a reader hands it on; with a `reason` it is quarantined."""

    image: bytes | None = None
    caption: str | None = None
    meta: str | None = None
    instructions: list[str] | None = None  # one per edit round
    targets: list[bytes] | None = None  # round r's target image
    reason: str | None = None


def first(names: Iterable[str], available) -> str | None:
    return next((n for n in names if n in available), None)


def text(data: bytes | str | None, what: str = "caption") -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for a caption, instruction or JSON member."""
    if data is None or isinstance(data, str):
        return data, None
    if not isinstance(data, bytes):
        return None, f"{what} is not text ({type(data).__name__})"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, f"{what} is not UTF-8"


def json_object(meta: str | None) -> dict[str, Any]:
    try:
        obj = json.loads(meta) if meta else {}
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


# ------------------------------------------------------------------ webdataset members


def _named_member(members: dict[str, bytes], key: str, name: Any) -> bytes | None:
    """The member a JSON value names: by its field ("tgt.jpg") or its file name."""
    if not isinstance(name, str):
        return None
    name = name.lower()
    field = name if name in members else name.removeprefix(f"{posixpath.basename(key).lower()}.")
    return members.get(field)


Chain = tuple[list[str] | None, list[bytes] | None, str | None]  # instructions, targets, why not


def _member_rounds(members: dict[str, bytes], key: str, rounds: Any, cols: ColumnsConfig) -> Chain:
    """The rounds a sample's JSON lists, each target naming a member."""
    if not isinstance(rounds, list):
        return None, None, f"the edit rounds of the sample's JSON are not a list ({type(rounds).__name__})"
    instructions, targets = [], []
    for r, item in enumerate(rounds):
        item = item if isinstance(item, dict) else {}
        instruction = item.get(first(cols.instruction, item) or "")
        target = _named_member(members, key, item.get(first(cols.target, item) or ""))
        if not isinstance(instruction, str):
            return None, None, f"edit round {r} has no instruction"
        if target is None:
            return None, None, f"edit round {r} has no target image"
        instructions.append(instruction)
        targets.append(target)
    return instructions, targets, None


def _member_chain(
    members: dict[str, bytes], key: str, obj: dict, cols: ColumnsConfig
) -> tuple[Chain, str | None]:
    """A sample's edit chain ((None, None, None) when it is not an edit), and the member
    used as its instruction. It is an edit when its JSON lists rounds, or it has a target:
    a target member, or a JSON target naming a member (a string: a JSON's numeric `target`
    is some other dataset's label)."""
    rounds = obj.get(first(cols.rounds, obj) or "")
    if rounds not in (None, []):
        return _member_rounds(members, key, rounds, cols), None
    target_field = first(cols.target, members)
    named = next((obj[k] for k in cols.target if isinstance(obj.get(k), str)), None)
    if target_field is None and named is None:
        return (None, None, None), None
    target = members[target_field] if target_field else _named_member(members, key, named)
    used = first(cols.instruction, members)
    instruction, why = (
        text(members[used], "instruction") if used else (obj.get(first(cols.instruction, obj) or ""), None)
    )
    if why or not isinstance(instruction, str):
        return (None, None, why or "edit round 0 has no instruction"), used
    if target is None:
        return (None, None, "edit round 0 has no target image"), used
    return ([instruction], [target], None), used


def member_fields(key: str, members: dict[str, bytes], cols: ColumnsConfig) -> Fields:
    """A webdataset sample's fields (field -> bytes)."""
    image = first(cols.image, members)
    meta, _ = text(members.get(first(cols.meta, members) or ""))
    (instructions, targets, reason), used = _member_chain(members, key, json_object(meta), cols)
    caption, why = text(members.get(first((c for c in cols.caption if c != used), members) or ""))
    if image is None:
        reason = f"no image member (has: {', '.join(sorted(members))})"
    return Fields(members.get(image or ""), caption, meta, instructions, targets, reason or why)


# ---------------------------------------------------------------------- table columns


@dataclass(frozen=True)
class ColumnRoles:
    """Which column of a table plays each role (None: the table has none)."""

    image: str
    caption: str | None
    key: str | None
    meta: str | None
    target: str | None  # single-round edits: the target image ...
    instruction: str | None  # ... and its instruction
    rounds: str | None  # multi-round edits: [{instruction, target}] per row

    @property
    def names(self) -> list[str]:
        return [c for c in (self.image, self.caption, self.key, self.meta, self.target,
                            self.instruction, self.rounds) if c]  # fmt: skip


def column_roles(names: list[str], cols: ColumnsConfig) -> ColumnRoles:
    """The roles of a table's columns; ValueError naming what is missing."""
    image = first(cols.image, names)
    if image is None:
        raise ValueError(f"no image column (looked for {', '.join(cols.image)}; has: {', '.join(names)})")
    rounds = first(cols.rounds, names)
    target = None if rounds else first(cols.target, names)
    instruction = first(cols.instruction, names) if target else None
    if target and instruction is None:
        raise ValueError(
            f"an edit target column ({target}) but no instruction column "
            f"(looked for {', '.join(cols.instruction)}; has: {', '.join(names)})"
        )
    caption = first((c for c in cols.caption if c != instruction), names)
    if caption is None and not (target or rounds):
        raise ValueError(f"no caption column (looked for {', '.join(cols.caption)}; has: {', '.join(names)})")
    key = cols.key if cols.key in names else None
    return ColumnRoles(image, caption, key, first(cols.meta, names), target, instruction, rounds)


def round_items(value: Any) -> list[dict]:
    """A rounds cell as a list of dicts: a list of structs as it is, Hugging Face's
    Sequence of a dict (a struct of equal-length lists) zipped into one."""
    if isinstance(value, dict):
        return [dict(zip(value, items)) for items in zip(*(v or [] for v in value.values()))]
    return [item if isinstance(item, dict) else {} for item in value or []]
