"""Global dedup: first committed wins, within and across shards, exact and near."""

import numpy as np

from uniloom.pipelines.data.config import FilterConfig
from uniloom.pipelines.data.dedup import EXACT, NEAR, DedupIndex, hamming, index_table, stale_failures


def sha(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_exact_duplicates_within_a_shard_keep_the_first_key_and_across_shards_the_owner():
    index = DedupIndex(FilterConfig(exact_dedup=True, near_dup_bits=-1))
    keep, reasons, owners = index.decide([sha(1), sha(2), sha(1)], np.zeros(3, np.uint64))
    assert keep.tolist() == [True, True, False] and reasons == [None, None, EXACT] and owners == set()
    index.add("a", [sha(1), sha(2)], np.zeros(2, np.uint64))
    keep, reasons, owners = index.decide([sha(2), sha(3)], np.zeros(2, np.uint64))
    assert keep.tolist() == [False, True] and reasons == [EXACT, None] and owners == {"a"}


def test_near_duplicates_by_hamming_distance_against_the_index_and_within_the_shard():
    index = DedupIndex(FilterConfig(exact_dedup=True, near_dup_bits=2))
    base = np.uint64(0b1111_0000)
    index.add("a", [sha(1)], np.array([base], np.uint64))
    hashes = np.array(
        [base ^ np.uint64(0b11), base ^ np.uint64(0b1_0000_0000_0111), np.uint64(1 << 40)], np.uint64
    )
    hashes = np.append(hashes, hashes[2] ^ np.uint64(1))  # near the previous row of this shard
    keep, reasons, owners = index.decide([sha(2), sha(3), sha(4), sha(5)], hashes)
    assert keep.tolist() == [False, True, True, False]
    assert reasons == [NEAR, None, None, NEAR] and owners == {"a"}


def test_off_switches_keep_everything():
    index = DedupIndex(FilterConfig(exact_dedup=False, near_dup_bits=-1))
    index.add("a", [sha(1)], np.zeros(1, np.uint64))
    keep, _, owners = index.decide([sha(1), sha(1)], np.zeros(2, np.uint64))
    assert keep.all() and not owners


def test_hamming_counts_differing_bits():
    a = np.array([0, 0b1011, 2**64 - 1], np.uint64)
    assert hamming(a, a[:1]).ravel().tolist() == [0, 3, 64]


def test_duplicates_counts_rows_matching_the_index_but_not_each_other():
    index = DedupIndex(FilterConfig(exact_dedup=True, near_dup_bits=1))
    index.add("a", [sha(1)], np.array([0b1000], np.uint64))
    phashes = np.array([0, 0b1001, 0b1_0000_0000, 0b1_0000_0000], np.uint64)
    assert index.duplicates([sha(1), sha(2), sha(3), sha(3)], phashes) == 2  # exact, near


def test_stale_failures_settle_owners_first_and_keep_what_agrees():
    """b lost duplicates to a; both failed to read. a's previous rows repeat a row this
    run kept, so a goes, and b (whose dropped pictures were a's) goes after it. With no
    such row both stay, and their hashes join the index."""
    entries = {"a": {"dedup_against": []}, "b": {"dedup_against": ["a"]}, "c": {"dedup_against": []}}
    tables = {
        "a": index_table(["x"], [sha(1)], np.array([1], np.uint64)),
        "b": index_table(["y"], [sha(2)], np.array([2], np.uint64)),
    }
    read: list[str] = []

    def read_index(sid):
        read.append(sid)
        return tables[sid]

    index = DedupIndex(FilterConfig(exact_dedup=True, near_dup_bits=-1))
    index.add("c", [sha(1)], np.array([9], np.uint64))  # c was redone and kept picture 1
    withdrawn = stale_failures(index, entries, ["b", "a"], {"c"}, read_index)
    assert withdrawn == {
        "a": "1 of its rows duplicate rows that this run's commits kept without its hashes",
        "b": "it lost duplicates to a, which changed in this run",
    }
    assert read == ["a"]

    index = DedupIndex(FilterConfig(exact_dedup=True, near_dup_bits=-1))
    assert stale_failures(index, entries, ["b", "a", "new"], {"c"}, read_index) == {}
    assert index.sha_owner == {sha(1): "a", sha(2): "b"}
