"""Global dedup: first committed wins, within and across shards, exact and near."""

import numpy as np

from uniloom.pipelines.data.config import FilterConfig
from uniloom.pipelines.data.dedup import EXACT, NEAR, DedupIndex, hamming


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
