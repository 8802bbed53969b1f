"""The statistics the benchmarks report: the rotating run order and the bootstrap interval."""
from __future__ import annotations

import random
import statistics
from collections import Counter

from bench.common import balanced_order
from bench.ddp_throughput import bootstrap_ratio


def test_balanced_order_gives_every_loop_every_position():
    names = ["a", "b", "c", "d"]
    order = balanced_order(names, 8)
    rounds = [order[i:i + 4] for i in range(0, len(order), 4)]
    assert all(sorted(r) == names for r in rounds)
    for pos in range(4):
        assert Counter(r[pos] for r in rounds) == {n: 2 for n in names}


def test_bootstrap_ratio_of_a_scaled_copy_is_exact():
    rng = random.Random(1)
    base = [[rng.uniform(0.07, 0.09) for _ in range(40)] for _ in range(6)]
    assert bootstrap_ratio(base, base) == (1.0, 1.0)
    low, high = bootstrap_ratio(base, [[s / 1.25 for s in run] for run in base])
    assert abs(low - 1.25) < 1e-12 and abs(high - 1.25) < 1e-12


def test_bootstrap_ratio_interval_covers_the_true_ratio_and_narrows_with_rounds():
    """Rounds drift (a shared machine); each loop's steps scatter around the round's level.
    The true ratio is 1.05; the interval must contain the point estimate, cover 1.05 and
    shrink when there are more rounds."""
    rng = random.Random(7)

    def rounds(n: int) -> tuple[list[list[float]], list[list[float]]]:
        base, ours = [], []
        for _ in range(n):
            level = rng.uniform(0.06, 0.09)
            base.append([level * rng.gauss(1.0, 0.08) for _ in range(40)])
            ours.append([level / 1.05 * rng.gauss(1.0, 0.08) for _ in range(40)])
        return base, ours

    widths = []
    for n in (6, 48):
        base, ours = rounds(n)
        low, high = bootstrap_ratio(base, ours)
        point = statistics.median(s for r in base for s in r) / \
            statistics.median(s for r in ours for s in r)
        assert low <= point <= high
        assert low < 1.05 < high
        widths.append(high - low)
    assert widths[1] < widths[0]
