"""The manifest: which input shard each output shard belongs to, the fingerprint it was
made with, and its row counts; and the planner that compares it with the inputs.

A shard's fingerprint covers (input shard content, stage config, text tokenizer, image
tokenizer weights, code version). Its entry also keeps the input's metadata key
(`input_meta`: file names, sizes, mtimes, ETags), so a rerun hashes the content only of
shards whose key moved (pipelines/data/discovery.py). The manifest is the commit point: a shard's files are
written under new names first (pipelines/data/commit.py) and a manifest record naming them
commits them, so a run killed at any instant leaves either the old or the new state.

Storage, so that a commit costs the same however many shards are committed:
  _manifest.json            snapshot: run-level records and every shard's entry, with the
                            sequence number of the last log record it includes
  _manifest/log/<seq>.json  one record per commit or removal since the snapshot
Loading reads the snapshot and applies the newer records in order; `save` (at the start and
end of a run) writes a new snapshot, then deletes the records it includes. A version-1
manifest (the snapshot alone, rewritten on every commit) loads as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.fs import join, open_fs, store_error, to_uri, write_atomic
from uniloom.pipelines.data.readers import InputShard
from uniloom.pipelines.errors import UniloomError

MANIFEST = "_manifest.json"
LOG = "_manifest/log"
VERSION = 2
READABLE = (1, 2)
# A shard's files by kind, and the folder of each (pipelines/data/commit.py writes them)
TABLES = {"output": "shards", "quarantine": "_quarantine", "filtered": "_filtered", "index": "_index"}
# Source files that decide what a row contains: editing one reprocesses every shard. The
# MingTok and BPE configs and contents are fingerprinted as data (config hash, weights
# hash, tokenizer hash), so only code that computes rows is listed.
CODE = {
    "uniloom.pipelines.data": [
        "readers.py", "tars.py", "fields.py", "hub.py", "source.py", "stages.py", "filters.py", "images.py",
        "prepare.py", "schema.py", "dedup.py", "text_tokenizer.py", "image_tokenizer.py", "commit.py",
    ],
    "uniloom.pipelines": ["precision.py", "workspace.py"],  # the encoder's autocast; where weights are read
    "uniloom.pipelines.tokenizer": ["kinds.py"],  # what each kind stores per token
    "uniloom.models": [  # the encoders, their shapes and blocks
        "mingtok.py", "mingtok_config.py", "unitok.py", "unitok_config.py", "tuna.py", "tuna_config.py",
        "blocks.py", "flow_head.py",
    ],
    "uniloom.kernels": ["flow_block.py", "_triton_flow_block.py"],  # the blocks' SwiGLU op
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
    paths (their content is fingerprinted instead), and the image tokenizer's architecture
    (`mingtok`: the config of any kind)."""
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


def input_meta(shard: InputShard) -> str:
    """The shard's metadata key: its files' names and metadata; '' when any file has none."""
    if not shard.meta or not all(shard.meta):
        return ""
    h = hashlib.blake2b(digest_size=16)
    base = posixpath.dirname(shard.files[0]) if len(shard.files) == 1 else shard.uri.split("://", 1)[-1]
    for path, meta in zip(shard.files, shard.meta):
        h.update(f"{posixpath.relpath(path, base)}\0{meta}\0".encode())
    return h.hexdigest()


def output_name(shard_id: str) -> str:
    """Flat, stable file name for a shard id (a relative path)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in shard_id.replace("/", "__"))
    return f"{safe}.parquet"


def entry_files(shard_id: str, entry: dict[str, Any]) -> dict[str, str]:
    """A manifest entry's files, relative to the output (entries of version-1 manifests
    name only the output; their files have the shard's plain name)."""
    if "files" in entry:
        return entry["files"]
    return {kind: f"{folder}/{output_name(shard_id)}" for kind, folder in TABLES.items()}


class Manifest:
    def __init__(self, out: str, storage_options: dict[str, Any]):
        self.fs, self.root = open_fs(out, storage_options)
        self.uri = to_uri(self.fs, self.root)
        self.path = join(self.root, MANIFEST)
        self.log = join(self.root, LOG)
        self.data: dict[str, Any] = {"version": VERSION, "shards": {}}
        self.seq = 0  # the last log record applied or written

    @classmethod
    def load(cls, out: str, storage_options: dict[str, Any]) -> Manifest:
        for attempt in range(5):  # a running writer may compact between our reads: read again
            m = cls(out, storage_options)
            problem = m._read()
            if problem is None:
                return m
            time.sleep(0.1 * (attempt + 1))
        raise UniloomError(f"{m.uri}: {problem}")

    def _read(self) -> str | None:
        """Snapshot, then the newer records; what is wrong if they do not follow on from it."""
        with store_error(self.fs, "read", self.path):
            try:
                blob = self.fs.cat_file(self.path)
            except FileNotFoundError:
                blob = None
        if blob is not None:
            self.data = self._json(self.path, blob)
            if self.data.get("version") not in READABLE:
                raise UniloomError(
                    f"{self.uri}/{MANIFEST} has version {self.data.get('version')}; this uniloom reads "
                    f"versions {', '.join(map(str, READABLE))}"
                )
            self.seq = self.data.get("log_seq", 0)
        records = [(seq, path) for seq, path in self._records() if seq > self.seq]
        seqs = [seq for seq, _ in records]
        if seqs != list(range(self.seq + 1, self.seq + 1 + len(records))):
            return f"the records in {LOG} do not follow on from its snapshot (record {self.seq}): {seqs[:5]}"
        try:
            blobs = self.fs.cat([path for _, path in records]) if records else {}
        except FileNotFoundError as e:
            return f"a record in {LOG} vanished while being read ({e})"
        for seq, path in records:
            self._apply(self._json(path, blobs[path]))
            self.seq = seq
        return None

    def _json(self, path: str, blob: bytes) -> dict[str, Any]:
        try:
            return json.loads(blob)
        except ValueError as e:
            raise UniloomError(f"{to_uri(self.fs, path)} is not valid JSON ({e})") from None

    def _records(self) -> list[tuple[int, str]]:
        """(sequence number, path) of the log records, in order."""
        self.fs.invalidate_cache(self.log)  # a listing cached earlier in this process is stale
        try:
            paths = self.fs.ls(self.log, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for path in paths:
            name = path.rsplit("/", 1)[-1]
            stem = name.removesuffix(".json")
            if not (stem.isdigit() and name.endswith(".json")):
                raise UniloomError(f"{to_uri(self.fs, path)} is not a manifest log record: remove it")
            out.append((int(stem), path))
        return sorted(out)

    def _apply(self, record: dict[str, Any]) -> None:
        if record["op"] == "put":
            self.shards[record["shard"]] = record["entry"]
        else:
            self.shards.pop(record["shard"], None)

    def _append(self, record: dict[str, Any]) -> None:
        """The commit: one small record, whatever the number of shards."""
        seq = self.seq + 1
        path = join(self.log, f"{seq:012d}.json")
        write_atomic(self.fs, self.root, path, json.dumps(record, sort_keys=True).encode())
        self.seq = seq
        self._apply(record)

    @property
    def shards(self) -> dict[str, dict[str, Any]]:
        return self.data["shards"]

    @property
    def pending(self) -> bool:
        """Records written since the last snapshot."""
        return self.seq > self.data.get("log_seq", 0)

    def put(self, shard_id: str, entry: dict[str, Any]) -> None:
        """Commit a shard's entry (its files written first)."""
        self._append({"op": "put", "shard": shard_id, "entry": entry})

    def remove(self, shard_id: str) -> None:
        self._append({"op": "remove", "shard": shard_id})

    def save(self) -> None:
        """Write a snapshot with run-level changes and every record so far, then drop the
        records it holds (a kill in between leaves records that loading skips)."""
        self.data["version"] = VERSION
        self.data["log_seq"] = self.seq
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_atomic(self.fs, self.root, self.path, json.dumps(self.data, indent=1, sort_keys=True).encode())
        old = [path for seq, path in self._records() if seq <= self.seq]
        if old:
            self.fs.rm(old)


def moved_owners(entry: dict[str, Any], entries: dict[str, dict[str, Any]]) -> list[str]:
    """The shards `entry` lost duplicates to whose kept rows are no longer those it was
    deduplicated against: gone from `entries`, or committed since with another index file.
    `dedup_against` maps each owner to its index file at this entry's commit (older entries
    list owner ids only, which shows only a gone owner)."""
    against = entry.get("dedup_against", {})
    recorded = against if isinstance(against, dict) else dict.fromkeys(against)
    return sorted(
        owner
        for owner, index in recorded.items()
        if owner not in entries or index not in (None, entry_files(owner, entries[owner])["index"])
    )


@dataclass
class Plan:
    done: list[str] = field(default_factory=list)
    todo: list[InputShard] = field(default_factory=list)  # in id order: the commit order
    reasons: dict[str, str] = field(default_factory=dict)  # why each todo shard is redone
    removed: list[str] = field(default_factory=list)  # outputs whose input disappeared
    # done shards whose metadata key moved while their content did not (a touched file):
    # their new key, for `record_touched`, so the next run need not hash them again
    touched: dict[str, str] = field(default_factory=dict)

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
    # redone as well (transitively), or those pictures would vanish from the output; so
    # must one whose owner changed in a run killed before it was redone.
    changed = set(p.reasons) | set(p.removed)
    moved = {sid for sid in p.done if moved_owners(entries[sid], entries)}
    while True:
        hit = [sid for sid in p.done if sid in moved or changed & set(entries[sid].get("dedup_against", []))]
        if not hit:
            break
        for sid in hit:
            p.done.remove(sid)
            p.reasons[sid] = "dedup owner changed"
            changed.add(sid)
    p.todo = [by_id[sid] for sid in sorted(p.reasons)]
    p.touched = {
        sid: key for sid in p.done if (key := input_meta(by_id[sid])) != entries[sid].get("input_meta")
    }
    return p


def record_touched(manifest: Manifest, p: Plan) -> None:
    """Give touched shards' entries their new metadata key, in memory: the run's next
    snapshot (`save`) records them all at once."""
    for sid, key in p.touched.items():
        manifest.shards[sid]["input_meta"] = key
