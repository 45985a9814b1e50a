"""shadow_plan: which slots a rank runs itself with a hot remote expert's borrowed weights
(pipelines/train/expert_parallel.py). Pure arithmetic, the same on every rank."""

import random

from uniloom.pipelines.train.expert_parallel import shadow_plan


def loads(counts, keep, num_local):
    """Slots each rank computes: its experts' slots from every rank, less the ones other
    ranks keep, plus the ones it keeps itself."""
    R = len(counts)
    return [
        sum(counts[r][e] - keep[r][e] for r in range(R) for e in range(o * num_local, (o + 1) * num_local))
        + sum(keep[o])
        for o in range(R)
    ]


def test_a_hot_expert_is_shared_with_the_light_rank_until_both_carry_the_same():
    counts = [[300, 10, 20, 10], [300, 10, 20, 10]]  # rank 0 owns experts 0, 1; rank 1 owns 2, 3
    keep = shadow_plan(counts, 2, min_slots=32)
    assert keep == [[0, 0, 0, 0], [280, 0, 0, 0]]  # rank 1 runs 280 of its own 300 slots for expert 0
    assert loads(counts, keep, 2) == [340, 340]


def test_nothing_is_lent_below_min_slots_or_when_off():
    counts = [[40, 10, 20, 10], [40, 10, 20, 10]]  # 100 against 60: 20 slots would even it out
    assert shadow_plan(counts, 2, min_slots=32) == [[0] * 4, [0] * 4]
    assert shadow_plan(counts, 2, min_slots=16)[1][0] == 20
    assert shadow_plan(counts, 2, min_slots=0) == [[0] * 4, [0] * 4]


def test_random_loads_never_get_worse_and_a_rank_only_keeps_its_own_slots_for_remote_experts():
    rng = random.Random(0)
    for _ in range(300):
        R, El = rng.choice([(2, 4), (4, 2), (8, 1)])
        hot = rng.randrange(R * El)
        counts = [[rng.randrange(0, 400 if e == hot else 60) for e in range(R * El)] for _ in range(R)]
        keep = shadow_plan(counts, El, min_slots=8)
        before, after = loads(counts, [[0] * (R * El)] * R, El), loads(counts, keep, El)
        assert sum(after) == sum(before) and max(after) <= max(before)
        for r in range(R):
            for e in range(R * El):
                assert 0 <= keep[r][e] <= counts[r][e]
                assert keep[r][e] == 0 or (e // El != r and keep[r][e] >= 8)
