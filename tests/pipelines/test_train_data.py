"""Training data without Ray: rows in the data stage's exact Parquet schema (real MingTok
latents of rendered scenes) -> task samples -> packed batches, and the stream's data
position (resume, epochs, a stage's new mix)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.models.sequence import pack
from uniloom.pipelines.config import load_config
from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import sample_scene, scene_objects
from uniloom.pipelines.data.schema import output_schema
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train.config import StageConfig
from uniloom.pipelines.train.data import COLUMNS, Packer, Position, Stream, TaskSampler

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip
N_ROWS = 60


def _ids(text: str) -> list[int]:
    """Stand-in for the BPE: ids past the special tokens, one per byte."""
    return [7 + b % 200 for b in text.encode()][:16]


@pytest.fixture(scope="module")
def shard_file(tmp_path_factory):
    torch.manual_seed(0)
    tok = MingTok(SMALL).eval()
    scenes = [sample_scene(4, i) for i in range(N_ROWS)]

    def encode(objects_list):
        pixels = np.stack([np.asarray(render(scene_objects(o), 32)) for o in objects_list])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        with torch.no_grad():
            return tok.encode(x).numpy().astype(np.float32)

    latents = encode([s["objects"] for s in scenes])
    edits = encode([s["edit"]["objects"] for s in scenes])
    rows = []
    for i, s in enumerate(scenes):
        has_edit = i % 3 != 0  # some rows (like real photos) have no edit target
        rows.append({
            "key": f"k{i:04d}", "source": "test", "caption": s["caption"], "text_ids": _ids(s["caption"]),
            "latents": latents[i].tobytes(), "latent_shape": [16, 32], "latent_dtype": "float32",
            "width": 32, "height": 32, "image_size": 32, "content_hash": str(i), "text_tokenizer": "t1",
            "image_tokenizer": "m1", "meta": "{}", "vqa": s["vqa"],
            "vqa_question_ids": [_ids(q["question"]) for q in s["vqa"]],
            "vqa_answer_ids": [_ids(q["answer"]) for q in s["vqa"]],
            "edit_instruction": s["edit"]["instruction"] if has_edit else None,
            "edit_instruction_ids": _ids(s["edit"]["instruction"]) if has_edit else None,
            "edit_latents": edits[i].tobytes() if has_edit else None,
        })  # fmt: skip
    path = tmp_path_factory.mktemp("shard") / "part.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=output_schema((16, 32), "float32")), path)
    return path


class FakeShard:
    """What ray.train.get_dataset_shard gives a worker: iter_batches over its rows."""

    def __init__(self, path, block: int = 16):
        self.table = pq.read_table(path, columns=COLUMNS)
        self.block = block
        self.epochs = 0

    def iter_batches(self, **_):
        self.epochs += 1
        for start in range(0, self.table.num_rows, self.block):
            yield self.table.slice(start, self.block)


def train_cfg(**overrides):
    sets = [
        f"train.{k}={v}"
        for k, v in {"seq_len": 128, "micro_batch": 2, "shuffle_buffer": 8, **overrides}.items()
    ]
    return load_config("tiny", overrides=sets).train


MIX = StageConfig(mix={"understanding": 0.25, "text_to_image": 0.25, "text": 0.25, "editing": 0.25})


def rows_of(path):
    return pq.read_table(path, columns=COLUMNS).to_pylist()


def test_sampler_is_a_function_of_seed_epoch_and_key(shard_file):
    t = train_cfg()
    rows = rows_of(shard_file)
    a, b = TaskSampler(MIX, t, "m1"), TaskSampler(MIX, t, "m1")
    for row in rows[:10]:
        x, y = a(row, 0), b(row, 0)
        assert x.task == y.task and torch.equal(x.input_ids, y.input_ids)
        assert torch.equal(x.image_latents, y.image_latents)
    tasks_epoch0 = [a(r, 0).task for r in rows]
    assert tasks_epoch0 != [a(r, 1).task for r in rows]  # another epoch, other draws


def test_mix_weights_and_what_a_row_supports(shard_file):
    t = train_cfg(guidance_drop=0.0)
    rows = rows_of(shard_file)
    counts = {}
    for epoch in range(10):
        for row in rows:
            s = TaskSampler(MIX, t, "m1")(row, epoch)
            counts[s.task] = counts.get(s.task, 0) + 1
            if s.task == "editing":
                assert row["edit_latents"] is not None
                assert int(s.image_targets.sum()) == 16  # the target image's latents are generated
    total = sum(counts.values())
    # Editing is drawn only where a target exists (2 rows in 3): 2/3 * 1/4 of the samples;
    # the other kinds share the rest: 2/3 * 1/4 + 1/3 * 1/3 each.
    expected = {"editing": 1 / 6, "understanding": 5 / 18, "text_to_image": 5 / 18, "text": 5 / 18}
    for task, share in expected.items():
        assert abs(counts[task] / total - share) < 0.06, (task, counts)
    only = StageConfig(mix={"editing": 1.0})
    no_edit = next(r for r in rows if r["edit_latents"] is None)
    assert TaskSampler(only, t, "m1")(no_edit, 0) is None


def test_latents_come_back_exactly_and_a_foreign_tokenizer_is_refused(shard_file):
    t = train_cfg()
    row = rows_of(shard_file)[0]
    s = TaskSampler(StageConfig(mix={"text_to_image": 1.0}), t, "m1")(row, 0)
    stored = np.frombuffer(row["latents"], np.float32).reshape(16, 32)
    assert torch.equal(s.image_latents, torch.from_numpy(stored.copy()))
    with pytest.raises(UniloomError, match="MingTok m1, expected m2"):
        TaskSampler(MIX, t, "m2")(row, 0)


def test_packer_places_samples_exactly_as_pack(shard_file):
    t = train_cfg()
    sampler = TaskSampler(MIX, t, "m1")
    samples = [s for s in (sampler(r, 0) for r in rows_of(shard_file)) if s is not None]
    packer, batches, start, used = Packer(2, 128), [], 0, 0
    for s in samples:
        batch = packer.add(s)
        if batch is not None:
            batches.append((batch, samples[start:used]))
            start = used
        used += 1
    assert len(batches) > 5
    for batch, members in batches:
        ref = pack(members, 128)
        assert batch.input_ids.shape[0] <= 2 and torch.equal(batch.input_ids, ref.input_ids)
        assert torch.equal(batch.doc_ids, ref.doc_ids)
        # the next sample would not have fitted: the batch is full by next-fit
    assert all(len(s) <= 128 for s in samples)


def _take(stream, n):
    out = []
    for _ in range(n):
        b = stream.next_batch()
        out.append(None if b is None else b.input_ids.clone())
    return out


def test_stream_is_deterministic_and_resumes_exactly(shard_file):
    t = train_cfg()
    first = Stream(FakeShard(shard_file), TaskSampler(MIX, t, "m1"), t, 0, Position())
    again = Stream(FakeShard(shard_file), TaskSampler(MIX, t, "m1"), t, 0, Position())
    head = _take(first, 4)
    assert all(torch.equal(a, b) for a, b in zip(head, _take(again, 4)))
    position = Position(first.position.epoch, first.position.rows)
    assert 0 < position.rows < N_ROWS
    resumed = Stream(FakeShard(shard_file), TaskSampler(MIX, t, "m1"), t, 0, position)
    assert all(torch.equal(a, b) for a, b in zip(_take(first, 3), _take(resumed, 3)))


def test_epoch_end_is_flagged_then_all_workers_start_the_next(shard_file):
    t = train_cfg()
    shard = FakeShard(shard_file)
    stream = Stream(shard, TaskSampler(MIX, t, "m1"), t, 0, Position())
    batches = 0
    while not stream.exhausted:
        stream.next_batch()
        batches += 1
    assert stream.position.rows == N_ROWS and batches > 3
    assert stream.next_batch() is None  # dry until the loop starts the next epoch
    stream.new_epoch()
    assert stream.position == Position(1, 0) and stream.next_batch() is not None and shard.epochs == 2


def test_a_new_stage_resamples_pending_rows_as_a_resume_would(shard_file):
    t = train_cfg()
    gen = StageConfig(mix={"text_to_image": 1.0})
    a = Stream(FakeShard(shard_file), TaskSampler(MIX, t, "m1"), t, 0, Position())
    _take(a, 3)
    position = Position(a.position.epoch, a.position.rows)
    a.set_sampler(TaskSampler(gen, t, "m1"))
    b = Stream(FakeShard(shard_file), TaskSampler(gen, t, "m1"), t, 0, position)
    assert all(torch.equal(x, y) for x, y in zip(_take(a, 3), _take(b, 3)))
