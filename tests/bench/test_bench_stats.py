"""The statistics the benchmarks report: the rotating run order, the bootstrap interval, a
gang's step times, and the --quick switch. References are written out here (plain medians,
sorted lists), never a bench's own earlier output."""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections import Counter

import pytest

from bench.common import (balanced_order, bootstrap_ratio, gang_steps, parse_args,
                          pooled_median, ratio_with_interval)


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


def test_balanced_order_of_three_rotates_and_rejects_bad_input():
    assert balanced_order(["a", "b", "c"], 4) == list("abc" "bca" "cab" "abc")
    with pytest.raises(ValueError, match="distinct"):
        balanced_order(["a", "a"], 2)
    with pytest.raises(ValueError, match="repeats"):
        balanced_order(["a", "b"], 0)


def test_ratio_with_interval_is_the_ratio_of_pooled_medians():
    """Three rounds, odd sample counts: the pooled medians are read off by hand."""
    num = [[3.0, 1.0], [5.0], [2.0, 4.0]]          # pooled 1 2 3 4 5 -> median 3
    den = [[1.5], [0.5, 2.5], [1.0, 2.0]]          # pooled 0.5 1 1.5 2 2.5 -> median 1.5
    assert pooled_median(num) == 3.0 and pooled_median(den) == 1.5
    rec = ratio_with_interval(num, den)
    assert rec["ratio"] == 2.0 and rec["rounds"] == 3
    low, high = rec["interval"]
    assert low <= 2.0 <= high
    # every resample is a ratio of medians of some rounds: bounded by the extreme round ratios
    assert low >= min(map(min, num)) / max(map(max, den))
    assert high <= max(map(max, num)) / min(map(min, den))


def test_bootstrap_ratio_rejects_unmatched_or_empty_rounds():
    with pytest.raises(ValueError, match="same rounds"):
        bootstrap_ratio([[1.0], [1.0]], [[1.0]])
    with pytest.raises(ValueError, match="at least one sample"):
        bootstrap_ratio([[1.0], []], [[1.0], [1.0]])
    with pytest.raises(ValueError, match="at least one sample"):
        pooled_median([])


def test_gang_steps_take_the_slowest_rank_of_each_step():
    rank0 = [0.10, 0.30, 0.20]
    rank1 = [0.15, 0.25, 0.20]
    assert gang_steps([rank0, rank1]) == [0.15, 0.30, 0.20]
    assert gang_steps([rank0]) == rank0
    with pytest.raises(ValueError, match="different step counts"):
        gang_steps([rank0, rank1[:2]])
    with pytest.raises(ValueError, match="no ranks"):
        gang_steps([])


def test_quick_switch_sets_smoke_defaults_but_explicit_flags_win(monkeypatch):
    def parser() -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser()
        ap.add_argument("--steps", type=int, default=40)
        ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
        return ap

    quick = {"steps": 3, "workers": [2]}
    monkeypatch.setattr(sys, "argv", ["bench"])
    full = parse_args(parser(), quick)
    assert (full.steps, full.workers, full.quick) == (40, [2, 4], False)
    monkeypatch.setattr(sys, "argv", ["bench", "--quick"])
    smoke = parse_args(parser(), quick)
    assert (smoke.steps, smoke.workers) == (3, [2])
    monkeypatch.setattr(sys, "argv", ["bench", "--quick", "--steps", "7"])
    assert parse_args(parser(), quick).steps == 7
