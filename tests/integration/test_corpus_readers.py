"""The corpus read back by the two readers users will point at it."""

import json

import pytest
import webdataset as wds

from uniloom.pipelines.config import CorpusConfig
from uniloom.pipelines.corpus.synth import synthesize

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return synthesize(CorpusConfig(num=120, shards=4, size=32, seed=9), out)


def _check(rows):
    keys = [r["__key__"] for r in rows]
    assert len(set(keys)) == len(keys) == 120
    for r in rows:
        key, png, txt, meta = r["__key__"], r["png"], r["txt"], r["json"]
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        meta = json.loads(meta)
        assert meta["key"] == key and meta["caption"] == txt.decode()


def test_webdataset_reads_complete_samples(shards):
    rows = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    _check(rows)


def test_ray_data_reads_complete_samples(shards, ray_local):
    import ray

    ds = ray.data.read_webdataset([str(p) for p in shards], decoder=None)
    rows = sorted(ds.take_all(), key=lambda r: r["__key__"])
    _check(rows)
