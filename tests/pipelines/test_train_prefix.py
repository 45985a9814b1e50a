"""Recipe prefix fingerprints and the earlier run a new `uniloom run` training starts from:
a change to stage 3 keeps stages 1-2's fingerprints, so the new run starts after stage 2
from an earlier run's copy of its end, where that copy is complete."""

import copy
import json

import fsspec
import pytest

from uniloom.pipelines.config import load_config
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train.trainer import (
    PREFIXES,
    STAGE_END_DONE,
    STAGE_ENDS,
    find_start,
    record_prefixes,
)
from uniloom.pipelines.workflow import StageResult
from uniloom.pipelines.workflow_stages import stage_prefixes, train_config


@pytest.fixture
def cfg(tmp_path):
    from uniloom.pipelines.data.image_tokenizer import save_random_weights
    from uniloom.pipelines.data.manifest import Manifest

    cfg = load_config("tiny", overrides=[f"workspace={tmp_path}"])
    weights = save_random_weights(cfg.mingtok, str(tmp_path / "mingtok.safetensors"))
    manifest = Manifest(str(tmp_path / "data"), {})
    manifest.shards["shard-0"] = {"fingerprint": "0" * 16}
    manifest.save()
    done = {
        "tokenizer": StageResult({"weights": weights}),
        "data": StageResult({"shards": str(tmp_path / "data")}),
    }
    return train_config(cfg, done)


def _sft_steps(c):
    c.train.stages["sft"].steps += 1


def _align_lr(c):
    c.train.stages["align"].lr *= 2


def _edited(cfg, edit):
    cfg = copy.deepcopy(cfg)
    edit(cfg)
    return stage_prefixes(cfg)


def test_a_stage_s_prefix_covers_it_and_the_stages_before_it(cfg):
    base = stage_prefixes(cfg)
    assert list(base) == ["align", "joint", "sft", "edit"] and len(set(base.values())) == 4
    assert stage_prefixes(cfg) == base

    def seed(c):
        c.train.seed += 1

    def operational(c):
        c.train.keep_checkpoints += 1
        c.train.storage = "/elsewhere"

    sft = _edited(cfg, _sft_steps)
    assert [sft[n] == base[n] for n in base] == [True, True, False, False]
    for edit in (_align_lr, seed):
        changed = _edited(cfg, edit)
        assert not any(changed[n] == base[n] for n in base), edit.__name__
    assert _edited(cfg, operational) == base
    # the run name follows the whole recipe's prefix
    assert cfg.train.run_name.endswith(base["edit"][:12])


def _run(fs, storage, name, prefixes, finished, world=2, marker_prefix=None):
    """A run folder as a training run leaves it: its prefix record and complete copies of
    the ends of the stages in `finished`."""
    run_dir = f"{storage}/{name}"
    record_prefixes(fs, run_dir, prefixes)
    for stage in finished:
        folder = f"{run_dir}/{STAGE_ENDS}/{stage}"
        fs.makedirs(folder, exist_ok=True)
        fs.pipe_file(
            f"{folder}/meta.json", json.dumps({"stage": stage, "done": True, "world": world}).encode()
        )
        for rank in range(world):
            fs.pipe_file(f"{folder}/rank-{rank:05d}.safetensors", b"x")
        marker = {"stage": stage, "prefix": marker_prefix or prefixes[stage]}
        fs.pipe_file(f"{folder}/{STAGE_END_DONE}", json.dumps(marker).encode())
    return run_dir


def test_a_new_run_starts_after_the_longest_finished_matching_prefix(cfg, tmp_path):
    fs = fsspec.filesystem("file")
    storage = str(tmp_path / "ray_results")
    old, new = stage_prefixes(cfg), _edited(cfg, _sft_steps)
    assert find_start(fs, storage, "new", new) is None  # no storage yet

    _run(fs, storage, "finished", old, ["align", "joint", "sft", "edit"])
    start = find_start(fs, storage, "new", new)
    assert (start.run, start.stage, start.meta["stage"]) == ("finished", "joint", "joint")
    assert start.uri == f"{storage}/finished/{STAGE_ENDS}/joint"
    assert find_start(fs, storage, "finished", new) is None  # a run never starts from itself

    # changing align's lr keeps no prefix: nothing to start from
    assert find_start(fs, storage, "new", _edited(cfg, _align_lr)) is None


def test_a_run_without_a_finished_stage_end_copy_is_not_used(cfg, tmp_path):
    fs = fsspec.filesystem("file")
    storage = str(tmp_path / "ray_results")
    old, new = stage_prefixes(cfg), _edited(cfg, _sft_steps)

    run_dir = _run(fs, storage, "died", old, ["align", "joint"])
    fs.rm(f"{run_dir}/{STAGE_ENDS}/joint/{STAGE_END_DONE}")  # its stage-2 copy never completed
    start = find_start(fs, storage, "new", new)
    assert (start.run, start.stage) == ("died", "align")  # the longest finished prefix: stage 1

    _run(fs, storage, "stale", old, ["joint"], marker_prefix="f" * 16)  # a copy of another config
    _run(fs, storage, "partial", old, ["joint"], world=3)  # a rank file missing
    fs.rm(f"{storage}/partial/{STAGE_ENDS}/joint/rank-00002.safetensors")
    _run(fs, storage, "no-record", {}, [])
    fs.rm(f"{storage}/no-record/{PREFIXES}")
    assert find_start(fs, storage, "new", new).run == "died"

    _run(fs, storage, "good", old, ["align", "joint"])
    assert (find_start(fs, storage, "new", new).run, find_start(fs, storage, "new", new).stage) == (
        "good",
        "joint",
    )

    fs.pipe_file(f"{storage}/died/{PREFIXES}", b"{not json")
    with pytest.raises(UniloomError, match=f"died/{PREFIXES} is corrupt"):
        find_start(fs, storage, "new", new)
