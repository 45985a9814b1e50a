"""row_moves: every rank ends with its share, only ranks above it send, nothing moves
below the threshold."""

import random

from uniloom.pipelines.train.flow_balance import row_moves


def test_row_moves_even_out_the_rows():
    assert row_moves([40, 0, 5, 9], 1) == [[0, 14, 8, 4], [0] * 4, [0] * 4, [0] * 4]
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randrange(0, 500) for _ in range(rng.choice([2, 3, 4, 8]))]
        moves = row_moves(counts, 1)
        R, total = len(counts), sum(counts)
        after = [counts[r] - sum(moves[r]) + sum(row[r] for row in moves) for r in range(R)]
        assert sorted(after) == sorted(total // R + (r < total % R) for r in range(R))
        assert all(moves[s][d] == 0 or counts[s] > total // R for s in range(R) for d in range(R))
        assert all(moves[r][r] == 0 for r in range(R))


def test_row_moves_leave_small_differences():
    assert row_moves([20, 10], 16) == [[0, 0], [0, 0]]
    assert row_moves([60, 10], 16) == [[0, 25], [0, 0]]
