"""Training data without Ray: rows in the data stage's exact Parquet schema (real MingTok
latents of rendered scenes) -> task samples -> packed batches, and the stream's data
position (resume, epochs, a stage's new mix); and edit chains and multi-turn VQA from a
synthetic corpus tar through the data stage's functions to training samples."""

import zlib
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.models.sequence import IGNORE, conversation, editing, pack
from uniloom.models.special_tokens import EOS, SPECIAL_IDS
from uniloom.pipelines.config import CorpusConfig, load_config
from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import sample_scene, scene_objects
from uniloom.pipelines.corpus.synth import synth_sample, write_tar
from uniloom.pipelines.data import text_tokenizer
from uniloom.pipelines.data.commit import OutputSpec, output_table
from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.discovery import discover
from uniloom.pipelines.data.image_tokenizer import Encoder, save_random_weights
from uniloom.pipelines.data.prepare import Prepare
from uniloom.pipelines.data.readers import read_shard
from uniloom.pipelines.data.schema import SOURCE_SCHEMA, output_schema
from uniloom.pipelines.data.stages import OK
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train.config import StageConfig
from uniloom.pipelines.train.data import (
    COLUMNS,
    Packer,
    Position,
    ShardSet,
    Stream,
    TaskSampler,
    coarse_centers,
)

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip
N_ROWS = 60


def _ids(text: str) -> list[int]:
    """Stand-in for the BPE: ids past the special tokens, one per word."""
    return [7 + zlib.crc32(w.encode()) % 200 for w in text.split()]


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
    edits = encode([e["objects"] for s in scenes for e in s["edits"]]).reshape(N_ROWS, 3, 16, 32)
    rows = []
    for i, s in enumerate(scenes):
        has_edit = i % 3 != 0  # some rows (like real photos) have no edit chain
        instructions = [e["instruction"] for e in s["edits"]]
        rows.append({
            "key": f"k{i:04d}", "source": "test", "caption": s["caption"], "text_ids": _ids(s["caption"]),
            "latents": latents[i].tobytes(), "latent_shape": [16, 32], "latent_dtype": "float32",
            "width": 32, "height": 32, "image_size": 32, "content_hash": str(i), "text_tokenizer": "t1",
            "image_tokenizer": "m1", "meta": "{}", "vqa": s["vqa"],
            "vqa_question_ids": [_ids(q["question"]) for q in s["vqa"]],
            "vqa_answer_ids": [_ids(q["answer"]) for q in s["vqa"]],
            "edit_instruction": instructions if has_edit else None,
            "edit_instruction_ids": [_ids(t) for t in instructions] if has_edit else None,
            "edit_latents": [z.tobytes() for z in edits[i]] if has_edit else None,
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
    counts, rounds = {}, {}
    sampler = TaskSampler(MIX, t, "m1")
    for epoch in range(10):
        for row in rows:
            s = sampler(row, epoch)
            counts[s.task] = counts.get(s.task, 0) + 1
            if s.task == "editing":
                assert row["edit_latents"] is not None
                # Every round's target latents are generated: 16 per round of the chain.
                n = int(s.image_targets.sum()) // 16
                rounds[n] = rounds.get(n, 0) + 1
    assert sampler.too_long == 0
    # Chains of 1, 2 and 3 rounds, about equally often.
    assert set(rounds) == {1, 2, 3} and min(rounds.values()) > 0.2 * sum(rounds.values()), rounds
    total = sum(counts.values())
    # Editing is drawn only where a target exists (2 rows in 3): 2/3 * 1/4 of the samples;
    # the other kinds share the rest: 2/3 * 1/4 + 1/3 * 1/3 each.
    expected = {"editing": 1 / 6, "understanding": 5 / 18, "text_to_image": 5 / 18, "text": 5 / 18}
    for task, share in expected.items():
        assert abs(counts[task] / total - share) < 0.06, (task, counts)
    only = StageConfig(mix={"editing": 1.0})
    no_edit = next(r for r in rows if r["edit_latents"] is None)
    assert TaskSampler(only, t, "m1")(no_edit, 0) is None


def test_rows_without_a_task_of_the_mix_are_counted_and_the_stream_skips_them(shard_file):
    """An editing-only stage: rows without an edit chain (every third) have no task; each
    is counted (the training metric samples_no_task) and the stream goes on past it."""
    t = train_cfg(guidance_drop=0.0)
    sampler = TaskSampler(StageConfig(mix={"editing": 1.0}), t, "m1")
    stream = Stream(FakeShard(shard_file), sampler, t, rank=0, start=Position())
    batches = []
    while (batch := stream.next_batch()) is not None:
        batches.append(batch)
    assert stream.exhausted and batches
    assert sampler.no_task == N_ROWS // 3 and sampler.too_long == 0


def test_latents_come_back_exactly_and_a_foreign_tokenizer_is_refused(shard_file):
    t = train_cfg()
    row = rows_of(shard_file)[0]
    s = TaskSampler(StageConfig(mix={"text_to_image": 1.0}), t, "m1")(row, 0)
    stored = np.frombuffer(row["latents"], np.float32).reshape(16, 32)
    assert torch.equal(s.image_latents, torch.from_numpy(stored.copy()))
    with pytest.raises(UniloomError, match="image tokenizer m1, expected m2"):
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


# ----------------------------------------------------------------------------- round trip


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """A synthetic corpus tar through the data stage's functions (read, Prepare, the MingTok
    Encoder, the commit's output table) into a Parquet shard: (shard rows, scenes, encoder)."""
    base = tmp_path_factory.mktemp("roundtrip")
    corpus = CorpusConfig(num=12, shards=1, size=32, seed=5)
    (base / "corpus").mkdir()
    write_tar(base / "corpus" / "shapes-00000.tar", (synth_sample(corpus, i) for i in range(corpus.num)))
    scenes = {f"{corpus.seed:04d}-{i:08d}": sample_scene(corpus.seed, i) for i in range(corpus.num)}
    texts = [t for s in scenes.values() for t in [s["caption"], *[e["instruction"] for e in s["edits"]]]]
    texts += [t for s in scenes.values() for p in s["vqa"] for t in p.values()]
    text = text_tokenizer.save_beside(text_tokenizer.train_bpe(texts, 300, 1), str(base / "out"), {})
    weights = save_random_weights(SMALL, str(base / "mingtok.safetensors"))
    exec_cfg = {"torch_threads": torch.get_num_threads(), "actor_gpus": 0, "encode_batch": 32}
    encoder = Encoder(asdict(SMALL), weights, {}, exec_cfg, "float32")
    d = DataConfig()
    (shard,) = discover([str(base / "corpus")], d)
    tables = []
    for block in read_shard(shard, d):
        n = block.num_rows
        block = block.append_column("shard", pa.array([shard.id] * n, pa.string()))
        block = block.append_column("shard_rows", pa.nulls(n, pa.int64())).select(SOURCE_SCHEMA.names)
        tables.append(encoder(Prepare(d, SMALL.image_size, text)(block)))
    rows = pa.concat_tables(tables)
    kept = rows.filter(pc.equal(rows.column("status"), OK))
    assert kept.num_rows == corpus.num
    spec = OutputSpec(SMALL.image_size, (16, 32), "float32", text.fingerprint, "m1")
    pq.write_table(output_table(kept, shard.uri, spec), base / "part.parquet")
    return rows_of(base / "part.parquet"), scenes, encoder, text_tokenizer.load(text)


def _target_images(sample, per_image: int = 16) -> torch.Tensor:
    """The generated images' latents of a sample, (images, N, C), in sequence order."""
    generated = sample.image_targets[sample.image_mask]
    return sample.image_latents[generated].view(-1, per_image, sample.image_latents.shape[1])


def test_edit_chains_round_trip_from_the_corpus_to_training_samples(round_trip):
    rows, scenes, encoder, tok = round_trip
    t = train_cfg(guidance_drop=0.0, seq_len=256)
    sampler = TaskSampler(StageConfig(mix={"editing": 1.0}), t, "m1")
    seen = set()
    for row in rows:
        edits = scenes[row["key"]]["edits"]
        assert len(row["edit_latents"]) == len(row["edit_instruction_ids"]) == len(edits) == 3
        assert [tok.decode(ids) for ids in row["edit_instruction_ids"]] == [e["instruction"] for e in edits]
        rendered = np.stack(
            [np.asarray(render(scene_objects(e["objects"]), SMALL.image_size)) for e in edits]
        )
        expected = torch.from_numpy(encoder.encode(rendered))  # (3, 16, 32): round r's target
        for epoch in range(4):
            s = sampler(row, epoch)
            targets = _target_images(s)
            n = targets.shape[0]
            seen.add(n)
            # Round r's target is generated after round r's instruction, with the source and
            # rounds < r (context, not targets) before it.
            assert torch.equal(targets, expected[:n])
            assert int(s.image_mask.sum()) == 16 * (n + 1) and not s.image_targets[s.image_mask][:16].any()
            ids = s.input_ids.tolist()
            for r in range(n):
                want = row["edit_instruction_ids"][r]
                assert any(ids[j : j + len(want)] == want for j in range(len(ids))), (r, edits[r])
    assert seen == {1, 2, 3} and sampler.too_long == 0


def test_multi_turn_vqa_has_one_answer_span_per_question(round_trip):
    rows, scenes, _, tok = round_trip
    t = train_cfg(vqa_share=1.0, seq_len=256)
    sampler = TaskSampler(StageConfig(mix={"understanding": 1.0}), t, "m1")
    firsts = set()
    for row in rows:
        pairs = scenes[row["key"]]["vqa"]
        s = sampler(row, 0)
        assert int(s.image_mask.sum()) == 16 and not s.image_targets.any()  # the image once
        targets = s.text_targets.tolist()
        spans, current = [], []
        for token in targets:
            if token != IGNORE:
                current.append(token)
            elif current:
                spans, current = spans + [current], []
        assert all(span[-1] == SPECIAL_IDS[EOS] for span in spans)
        answers = [tok.decode(span[:-1]) for span in spans]
        assert len(spans) == len(pairs) and sorted(answers) == sorted(p["answer"] for p in pairs)
        firsts.add(answers[0])
    assert len(firsts) > 1  # the turns come in a drawn order, not always the count first


def test_the_tiny_presets_rows_hold_whole_edit_chains_and_conversations():
    cfg = load_config("tiny")
    scenes = [sample_scene(cfg.corpus.seed, i) for i in range(500)]
    texts = [t for s in scenes for t in [s["caption"], *[e["instruction"] for e in s["edits"]]]]
    texts += [t for s in scenes for p in s["vqa"] for t in p.values()]
    tok = text_tokenizer.train_bpe(texts, cfg.data.bpe_vocab_size, cfg.data.bpe_min_frequency)

    def ids(text):
        return tok.encode(text, add_special_tokens=False).ids

    z = torch.zeros(cfg.mingtok.num_tokens, cfg.mingtok.latent_dim)
    for s in scenes:
        chain = editing(z, [(ids(e["instruction"]), z) for e in s["edits"]])
        talk = conversation(z, [(ids(p["question"]), ids(p["answer"])) for p in s["vqa"]])
        assert max(len(chain), len(talk)) <= cfg.train.seq_len, s


def test_coarse_centers_are_kmeans_of_the_shards_latents_and_deterministic(shard_file):
    import fsspec

    shards = ShardSet(str(shard_file.parent), [str(shard_file)], fsspec.filesystem("file"), "t1", "m1")
    centers = coarse_centers(shards, 4, seed=0)
    assert centers.shape == (4, 32)
    assert torch.equal(centers, coarse_centers(shards, 4, seed=0))
    latents = torch.cat([torch.from_numpy(np.frombuffer(r["latents"], np.float32).reshape(16, 32).copy())
                         for r in rows_of(shard_file)])  # fmt: skip
    nearest = torch.cdist(latents, centers).argmin(-1)
    # each centre is the mean of the latents nearest it (k-means' fixed point), none empty
    for j in range(4):
        assert (nearest == j).any()
        torch.testing.assert_close(centers[j], latents[nearest == j].mean(0), atol=1e-4, rtol=1e-4)
    with pytest.raises(UniloomError, match="coarse_codes is 100000"):
        coarse_centers(shards, 100000, seed=0)
