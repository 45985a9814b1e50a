"""The manifest: which input shard each output shard belongs to, the fingerprint it was
made with, and its row counts; and the planner that compares it with the inputs.

A shard's fingerprint covers (input shard content, stage config, text tokenizer, image
tokenizer weights, code version). The manifest is the commit point: a shard's files are
renamed into place first and the manifest (written whole, then renamed) records them
after, so a run killed at any instant leaves either the old or the new state of a shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.fs import join, open_fs, to_uri, write_atomic
from uniloom.pipelines.data.readers import InputShard
from uniloom.pipelines.errors import UniloomError

MANIFEST = "_manifest.json"
VERSION = 1
# Source files that decide what a row contains: editing one reprocesses every shard. The
# MingTok and BPE configs and contents are fingerprinted as data (config hash, weights
# hash, tokenizer hash), so only code that computes rows is listed.
CODE = {
    "uniloom.pipelines.data": [
        "readers.py", "stages.py", "filters.py", "images.py", "prepare.py", "schema.py",
        "dedup.py", "text_tokenizer.py", "image_tokenizer.py", "commit.py",
    ],
    "uniloom.pipelines.corpus": ["render.py", "scenes.py"],  # edit targets
    "uniloom.models": ["mingtok.py"],  # the encoder
}  # fmt: skip


def code_version() -> str:
    h = hashlib.sha256()
    for package, names in CODE.items():
        for name in names:
            h.update(f"{package}/{name}\0".encode())
            h.update((resources.files(package) / name).read_bytes())
    return h.hexdigest()[:16]


def config_hash(data: DataConfig, mingtok: Any) -> str:
    """The parts of the config that change rows: `data` without how-to-run knobs and
    paths (their content is fingerprinted instead), and the MingTok architecture."""
    d = dataclasses.asdict(data)
    for operational in ("exec", "storage_options", "tokenizer_weights", "text_tokenizer"):
        d.pop(operational)
    blob = json.dumps({"data": d, "mingtok": dataclasses.asdict(mingtok)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageIdentity:
    """Everything but the input that a shard's output depends on."""

    config: str
    text_tokenizer: str
    image_tokenizer: str
    code: str

    def changes(self, other: dict[str, str]) -> list[str]:
        return [k for k, v in dataclasses.asdict(self).items() if other.get(k) != v]


def shard_fingerprint(input_hash: str, stage: StageIdentity) -> str:
    blob = json.dumps({"input": input_hash, **dataclasses.asdict(stage)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def output_name(shard_id: str) -> str:
    """Flat, stable file name for a shard id (a relative path)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in shard_id.replace("/", "__"))
    return f"{safe}.parquet"


class Manifest:
    def __init__(self, out: str, storage_options: dict[str, Any]):
        self.fs, self.root = open_fs(out, storage_options)
        self.uri = to_uri(self.fs, self.root)
        self.path = join(self.root, MANIFEST)
        self.data: dict[str, Any] = {"version": VERSION, "shards": {}}

    @classmethod
    def load(cls, out: str, storage_options: dict[str, Any]) -> Manifest:
        m = cls(out, storage_options)
        if m.fs.exists(m.path):
            try:
                m.data = json.loads(m.fs.cat_file(m.path))
            except ValueError as e:
                raise UniloomError(f"{m.uri}/{MANIFEST} is not valid JSON ({e})") from None
            if m.data.get("version") != VERSION:
                raise UniloomError(
                    f"{m.uri}/{MANIFEST} has version {m.data.get('version')}, expected {VERSION}"
                )
        return m

    @property
    def shards(self) -> dict[str, dict[str, Any]]:
        return self.data["shards"]

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_atomic(self.fs, self.root, self.path, json.dumps(self.data, indent=1, sort_keys=True).encode())


@dataclass
class Plan:
    done: list[str] = field(default_factory=list)
    todo: list[InputShard] = field(default_factory=list)  # in id order: the commit order
    reasons: dict[str, str] = field(default_factory=dict)  # why each todo shard is redone
    removed: list[str] = field(default_factory=list)  # outputs whose input disappeared

    def states(self) -> dict[str, str]:
        out = {sid: "done" for sid in self.done}
        out.update({s.id: "missing" if self.reasons[s.id] == "new" else "stale" for s in self.todo})
        out.update({sid: "orphaned" for sid in self.removed})
        return out


def plan(shards: list[InputShard], hashes: dict[str, str], stage: StageIdentity, manifest: Manifest) -> Plan:
    p = Plan()
    entries = manifest.shards
    by_id = {s.id: s for s in shards}
    for s in shards:
        e = entries.get(s.id)
        if e is None:
            p.reasons[s.id] = "new"
        elif e["input_hash"] != hashes[s.id]:
            p.reasons[s.id] = "input changed"
        elif changed := stage.changes(e["stage"]):
            p.reasons[s.id] = f"{', '.join(changed)} changed"
        else:
            p.done.append(s.id)
    p.removed = sorted(sid for sid in entries if sid not in by_id)
    # A shard that dropped duplicates owned by a shard being redone or removed must be
    # redone as well (transitively), or those pictures would vanish from the output.
    changed = set(p.reasons) | set(p.removed)
    while True:
        hit = [sid for sid in p.done if changed & set(entries[sid].get("dedup_against", []))]
        if not hit:
            break
        for sid in hit:
            p.done.remove(sid)
            p.reasons[sid] = "dedup owner changed"
            changed.add(sid)
    p.todo = [by_id[sid] for sid in sorted(p.reasons)]
    return p
