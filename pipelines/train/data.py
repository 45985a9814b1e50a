"""Training data: the data stage's Parquet shards -> task samples -> packed batches.

    driver:  committed shards of the manifest, fingerprints checked against the model's
             MingTok -> ray.data.read_parquet (lazy; never materialised)
    worker:  ray.train.get_dataset_shard("train") (one streaming split per worker)
             -> rows -> seeded shuffle buffer -> one task sample per row
             -> next-fit packing into `micro_batch` rows of `seq_len` tokens

Determinism: the split is order-preserving, the shuffle buffer is seeded by (seed, epoch,
rank) and a row's task, VQA turn order, edit rounds and guidance drop by (seed, epoch,
key), so a seed fixes every batch of every worker. A worker's data position is (epoch, rows
consumed into finished batches); resuming replays the epoch and skips that many rows,
which is exact at the same number of workers (and keeps the epoch's progress with another
number).

Epochs: a streaming split starts a new epoch only when every worker asks for it, while
workers meet at every gradient all-reduce. A worker that runs out therefore only says so;
the loop agrees on it at the next step (`Stream.exhausted`, all-reduced) and all workers
start the next epoch together, dropping the few rows the others had left.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from uniloom.pipelines.data.fs import join, open_fs
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train.config import TASK_KINDS, StageConfig, TrainConfig

COLUMNS = [
    "key", "text_ids", "latents", "latent_shape", "latent_dtype", "image_tokenizer", "text_tokenizer",
    "vqa_question_ids", "vqa_answer_ids", "edit_instruction_ids", "edit_latents",
]  # fmt: skip
MANIFEST = "_manifest.json"


# ----------------------------------------------------------------------------- driver side


@dataclass
class ShardSet:
    uri: str
    files: list[str]  # paths inside `fs`
    fs: Any
    text_tokenizer: str  # fingerprints recorded by the data stage
    image_tokenizer: str
    image_kind: str = "mingtok"  # what the latents hold (tokenizer.kind of the data run)


def find_shards(uri: str, storage_options: dict[str, Any]) -> ShardSet:
    """The committed output shards of a data run (its manifest is the commit record)."""
    from uniloom.pipelines.data.commit import shard_paths
    from uniloom.pipelines.data.manifest import Manifest

    fs, root = open_fs(uri, storage_options)
    if not fs.exists(join(root, MANIFEST)):
        raise UniloomError(f"{uri}: no {MANIFEST}; make the shards with `uniloom data run --output {uri}`")
    manifest = Manifest.load(uri, storage_options)
    entries = manifest.shards
    files = [
        shard_paths(manifest, sid)["output"] for sid in sorted(entries) if entries[sid]["rows"]["written"]
    ]
    if not files:
        raise UniloomError(f"{uri}: the data run wrote no rows")
    image_fps = {entries[sid]["stage"]["image_tokenizer"] for sid in entries}
    text_fps = {entries[sid]["stage"]["text_tokenizer"] for sid in entries}
    if len(image_fps) > 1 or len(text_fps) > 1:
        raise UniloomError(f"{uri}: shards were made with different tokenizers; rerun `uniloom data run`")
    kind = (manifest.data.get("image_tokenizer") or {}).get("kind", "mingtok")  # older runs: MingTok's
    return ShardSet(uri, files, fs, text_fps.pop(), image_fps.pop(), kind)


def check_image_kind(shards: ShardSet, image_kind: str) -> None:
    """A model reads one kind of image token: refuse shards of another, in one line."""
    if shards.image_kind != image_kind:
        raise UniloomError(
            f"shards in {shards.uri} hold {shards.image_kind} image tokens, but the model reads {image_kind} "
            f"(model.image_kind follows tokenizer.kind): run with --set tokenizer.kind={shards.image_kind}, "
            f"or rerun `uniloom data run` with a {image_kind} tokenizer"
        )


def check_image_tokenizer(shards: ShardSet, fingerprint: str, weights: str) -> None:
    """Image tokens are only meaningful to the tokenizer that made them: refuse any other."""
    if shards.image_tokenizer != fingerprint:
        raise UniloomError(
            f"shards in {shards.uri} were tokenized by image tokenizer {shards.image_tokenizer}, but the "
            f"model uses {fingerprint} (data.tokenizer_weights={weights or '(unset)'}): train with "
            "the weights that made the shards, or rerun `uniloom data run` with these"
        )


def read_dataset(shards: ShardSet, t: TrainConfig):
    """Lazy Ray Dataset over the shards, in file order (the split preserves it)."""
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from uniloom.pipelines.data.fs import is_local

    filesystem = None if is_local(shards.fs) else PyFileSystem(FSSpecHandler(shards.fs))
    # Ray Data's V2 Parquet reader lists the files in a task of one whole CPU, which never
    # starts once the training workers hold more than all but one CPU of every node (a
    # worker of 1.5 CPUs on each 2-CPU node: training waited forever); V1's read tasks
    # ask read_cpus only. The dataset keeps the context it was created with.
    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(
            shards.files, filesystem=filesystem, columns=COLUMNS, num_cpus=t.read_cpus
        )
    finally:
        context.use_datasource_v2 = v2


def coarse_centers(shards: ShardSet, k: int, seed: int, max_latents: int = 65536, iters: int = 25):
    """MingTok's coarse codes (model.coarse_codes): k-means centres (k, C) of the shards'
    image latents, read from the first files up to `max_latents`, so every run over the
    same shards gets the same centres. An empty cluster restarts at a random latent."""
    import pyarrow.parquet as pq
    import torch

    chunks, n = [], 0
    for path in shards.files:
        with shards.fs.open(path, "rb") as f:
            rows = pq.read_table(f, columns=["latents", "latent_shape", "latent_dtype"]).to_pylist()
        for row in rows:
            chunks.append(_latents(row["latents"], row["latent_shape"], row["latent_dtype"]))
            n += chunks[-1].shape[0]
            if n >= max_latents:
                break
        if n >= max_latents:
            break
    if n < k:
        raise UniloomError(f"model.coarse_codes is {k} but the shards in {shards.uri} hold {n} image latents")
    x = torch.cat(chunks)[:max_latents]
    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(iters):
        nearest = torch.cdist(x, centers).argmin(-1)
        for j in range(k):
            members = x[nearest == j]
            centers[j] = members.mean(0) if len(members) else x[torch.randint(len(x), (1,), generator=gen)[0]]
    return centers


# ----------------------------------------------------------------------------- rows -> samples


def _latents(blob: bytes, shape, dtype: str):
    """A stored image's values as a tensor: latents as float32, codes (UniTok) as long."""
    import torch

    values = np.frombuffer(blob, dtype=dtype).reshape(shape)
    return torch.from_numpy(
        values.astype(np.int64 if np.issubdtype(values.dtype, np.integer) else np.float32)
    )


class TaskSampler:
    """One training sample per row, its task drawn with the stage's mix among the tasks
    the row supports (editing needs an edit chain, the others a caption), seeded by
    (seed, epoch, key).

    VQA is one conversation over all of the row's question-answer pairs, in a drawn order
    (evaluation asks each question first, right after the image). Editing trains the first
    1..R rounds of the row's chain, the count uniform, each round generated with the
    previous round's output in context. A sample longer than `seq_len` is skipped and
    counted in `too_long`: the preset's seq_len is sized so that this stays rare. A row
    that supports none of the stage's tasks (an editing-only mix and a row without an edit
    chain, a captioning mix and an edit sample without a caption) is skipped and counted in
    `no_task`; both are logged as training metrics."""

    def __init__(self, stage: StageConfig, t: TrainConfig, image_tokenizer: str):
        self.mix = {k: stage.mix.get(k, 0.0) for k in TASK_KINDS}
        self.seed, self.drop, self.vqa_share = t.seed, t.guidance_drop, t.vqa_share
        self.seq_len, self.image_tokenizer = t.seq_len, image_tokenizer
        self.too_long = 0
        self.no_task = 0

    def rng(self, key: str, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, zlib.crc32(key.encode())])

    def __call__(self, row: dict[str, Any], epoch: int):
        from uniloom.models import sequence

        if row["image_tokenizer"] != self.image_tokenizer:
            raise UniloomError(
                f"row {row['key']}: image tokenizer {row['image_tokenizer']}, expected {self.image_tokenizer}"
            )
        rng = self.rng(row["key"], epoch)
        can_edit = bool(row["edit_latents"]) and bool(row["edit_instruction_ids"])
        captioned = row["text_ids"] is not None  # an editing set's samples may have no caption
        weights = np.array(
            [self.mix[k] if (can_edit if k == "editing" else captioned) else 0.0 for k in TASK_KINDS]
        )
        if weights.sum() <= 0:
            self.no_task += 1
            return None
        task = TASK_KINDS[rng.choice(len(TASK_KINDS), p=weights / weights.sum())]
        shape, dtype = row["latent_shape"], row["latent_dtype"]
        image = _latents(row["latents"], shape, dtype)
        caption = row["text_ids"]
        drop = "none"
        if task in ("text_to_image", "editing") and rng.random() < self.drop:
            drop = "text" if rng.random() < 0.5 else "turn"
        if task == "understanding":
            questions = row["vqa_question_ids"] or []
            if questions and rng.random() < self.vqa_share:
                answers = row["vqa_answer_ids"]
                turns = [(questions[i], answers[i]) for i in rng.permutation(len(questions))]
                sample = sequence.conversation(image, turns)
            else:
                sample = sequence.understanding(image, [], caption)
        elif task == "text_to_image":
            sample = sequence.text_to_image(caption, image, drop=drop)
        elif task == "text":
            sample = sequence.text_only(caption)
        else:
            n = int(rng.integers(1, len(row["edit_latents"]) + 1))
            chain = zip(row["edit_instruction_ids"][:n], row["edit_latents"][:n])
            rounds = [(ids, _latents(z, shape, dtype)) for ids, z in chain]
            sample = sequence.editing(image, rounds, drop=drop)
        if len(sample) > self.seq_len:
            self.too_long += 1
            return None
        return sample


# ----------------------------------------------------------------------------- packing


class Packer:
    """Next-fit packing, exactly as models.sequence.pack places samples, into batches of
    at most `rows` rows: `add` returns the finished batch when a sample no longer fits."""

    def __init__(self, rows: int, seq_len: int):
        self.rows, self.seq_len = rows, seq_len
        self.samples: list = []
        self.used_rows, self.used = 0, seq_len

    def add(self, sample):
        """Returns a finished batch (without `sample`, which starts the next) or None."""
        from uniloom.models.sequence import pack

        n = len(sample)
        if self.used + n > self.seq_len and self.used_rows == self.rows:
            batch = pack(self.samples, self.seq_len)
            self.samples, self.used_rows, self.used = [], 0, self.seq_len
            self.add(sample)
            return batch
        if self.used + n > self.seq_len:
            self.used_rows, self.used = self.used_rows + 1, 0
        self.samples.append(sample)
        self.used += n
        return None

    def flush(self):
        from uniloom.models.sequence import pack

        batch = pack(self.samples, self.seq_len) if self.samples else None
        self.samples, self.used_rows, self.used = [], 0, self.seq_len
        return batch


# ----------------------------------------------------------------------------- the stream


@dataclass
class Position:
    epoch: int = 0
    rows: int = 0  # rows of `epoch` consumed into finished batches


class Stream:
    """A worker's batches. `next_batch` returns a batch (short, or None, at the end of the
    worker's epoch); `exhausted` says the split ran out; `new_epoch` starts the next one
    (all workers together); `set_sampler` switches the task mix between stages."""

    def __init__(self, shard, sampler: TaskSampler, t: TrainConfig, rank: int, start: Position):
        self.shard, self.sampler, self.t, self.rank = shard, sampler, t, rank
        self.packer = Packer(t.micro_batch, t.seq_len)
        self.position = Position(start.epoch, 0)
        self._skip = start.rows
        self._pending: list[dict[str, Any]] = []  # rows pulled since the last finished batch
        self._replay: deque[dict[str, Any]] = deque()
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.exhausted = False
        self._rows = self._shuffled(self._epoch_rows())

    def _epoch_rows(self) -> Iterator[dict[str, Any]]:
        for table in self.shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            yield from table.to_pylist()

    def _shuffled(self, rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng([self.t.seed, self.position.epoch, self.rank, 1])
        buffer: list[dict[str, Any]] = []
        for row in rows:
            if len(buffer) < self.t.shuffle_buffer:
                buffer.append(row)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], row = row, buffer[i]
            yield row
        rng.shuffle(buffer)
        yield from buffer

    def _next_row(self) -> dict[str, Any] | None:
        if self._replay:
            return self._replay.popleft()
        while self._skip:
            if next(self._rows, None) is None:
                return None
            self._skip -= 1
            self.position.rows += 1
        return next(self._rows, None)

    def next_batch(self):
        if self.exhausted:
            return None
        while True:
            row = self._next_row()
            if row is None:
                self.exhausted = True
                self.position.rows += len(self._pending)
                self._pending = []
                return self.packer.flush()
            self._pending.append(row)
            sample = self.sampler(row, self.position.epoch)
            if sample is None:
                continue
            batch = self.packer.add(sample)
            if batch is not None:  # it holds every pending row but the last
                self.position.rows += len(self._pending) - 1
                self._pending = self._pending[-1:]
                return batch

    def new_epoch(self) -> None:
        self.position = Position(self.position.epoch + 1, 0)
        self.packer.flush()
        self._pending, self._replay, self._skip = [], deque(), 0
        self._start_epoch()

    def set_sampler(self, sampler: TaskSampler) -> None:
        """Rows not yet in a finished batch are sampled again with the new mix, as a
        resume from this point (which replays them) would."""
        self.sampler = sampler
        self.packer.flush()
        self._replay = deque([*self._pending, *self._replay])
        self._pending = []
