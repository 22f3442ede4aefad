"""Intervals for the numbers a study compares: percentile bootstrap over items (or seeds), seeded.

A recovery ratio (acc_attacked − acc_unlearned) / (acc_target − acc_unlearned) is a ratio of means over the
same items, so its interval comes from resampling *items* and recomputing the whole statistic on each resample
(the three accuracies move together), not from combining three separate intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from unlearn.storage import records

Rows = np.ndarray  # one row per item (or seed), one column per measured quantity


@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on the data itself
    low: float
    high: float
    n: int  # rows it was computed from
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def bootstrap(rows: Sequence[Sequence[float]] | Sequence[float], statistic: Callable[[Rows], float] | None = None,
              level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of `statistic` (default: the mean of a single column) over `rows`.

    Resamples whose statistic is undefined (nan: a recovery ratio whose denominator vanished) are dropped; if
    more than half are, the interval is reported as nan rather than built from a biased remainder."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    data = np.asarray(rows, dtype=float)
    if data.ndim == 1:
        data = data[:, None]
    n = len(data)
    if n == 0:
        raise ValueError("no rows to bootstrap")
    stat = statistic or (lambda d: float(d[:, 0].mean()))
    value = float(stat(data))
    rng = np.random.default_rng(seed)
    draws = [stat(data[rng.integers(0, n, n)]) for _ in range(resamples)]
    return percentile_interval(value, draws, n, level, degenerate=n == 1)


def percentile_interval(value: float, draws: Sequence[float], n: int, level: float = 0.95,
                        degenerate: bool = False) -> Interval:
    """The percentile interval of bootstrap `draws` around `value`, the statistic on the data itself. Undefined
    draws (nan) are dropped; if more than half are, or the data are `degenerate` (nothing to resample), the interval
    is nan rather than built from a biased remainder."""
    values = np.asarray(draws, dtype=float)
    finite = values[np.isfinite(values)]
    if degenerate or len(finite) < len(values) / 2:
        return Interval(value, math.nan, math.nan, n, level)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(value, float(low), float(high), n, level)


def recovery_of_means(data: Rows, better: str = "lower") -> float:
    """Columns: per item, correct (1/0 or a probability) for the target, the unlearned and the attacked model.
    The ratio of their means by the attack reports' own rule (records.recovery_ratio), nan where it is undefined."""
    target, unlearned, attacked = (float(data[:, k].mean()) for k in range(3))
    ratio, _ = records.recovery_ratio(attacked, unlearned, target, better)
    return math.nan if ratio is None else ratio


UNRELIABLE_NOTE = "unreliable: what unlearning removed on this metric is within its item noise"


def removal_beyond_noise(target: Sequence[float], unlearned: Sequence[float], level: float = 0.95,
                         resamples: int = 2000, seed: int = 0) -> bool:
    """Whether the recovery ratio's denominator, target − unlearned over the same items, is told apart from 0 by its
    bootstrap interval (either sign: the ratio's own rule says which direction counts)."""
    rows = np.column_stack([target, unlearned]).astype(float)
    gap = bootstrap(rows, lambda d: float(d[:, 0].mean() - d[:, 1].mean()), level, resamples, seed)
    return math.isfinite(gap.low) and (gap.low > 0 or gap.high < 0)


def recovery_interval(target: Sequence[float], unlearned: Sequence[float], attacked: Sequence[float],
                      better: str = "lower", level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """The recovery ratio over items with its bootstrap interval: the three models' values on the same items."""
    if not len(target) == len(unlearned) == len(attacked):
        raise ValueError(f"per-item values of unequal length: {len(target)}, {len(unlearned)}, {len(attacked)}")
    rows = np.column_stack([target, unlearned, attacked]).astype(float)
    return bootstrap(rows, lambda d: recovery_of_means(d, better), level, resamples, seed)


def simultaneous_level(members: int, level: float = 0.95) -> float:
    """The level each of `members` intervals needs so that all of them hold at once with probability >= `level`
    (Bonferroni: the miss probabilities add up)."""
    return 1 - (1 - level) / max(members, 1)


@dataclass(frozen=True)
class WorstCase:
    """The largest of several members' values (recovery ratios) and an interval for it that accounts for picking the
    largest: with every member's interval at `simultaneous_level`, all hold at once with probability >= `level`, and
    then the true maximum lies in [max of the lows, max of the highs]."""

    member: str
    value: float
    low: float
    high: float
    level: float
    each_level: float


def worst_case(intervals: dict[str, Interval], level: float = 0.95) -> WorstCase:
    """`intervals`: each member's value with its interval at `simultaneous_level(len(intervals), level)`. A member
    without an interval (nan) leaves the worst case's interval undefined, not narrower."""
    if not intervals:
        raise ValueError("a worst case needs at least one member")
    member = max(intervals, key=lambda name: intervals[name].value)
    lows = [i.low for i in intervals.values()]
    highs = [i.high for i in intervals.values()]
    bounded = all(math.isfinite(x) for x in lows + highs)
    return WorstCase(member, intervals[member].value, max(lows) if bounded else math.nan,
                     max(highs) if bounded else math.nan, level, simultaneous_level(len(intervals), level))


def roc_auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """ROC AUC of telling non-members (label 1) from members (label 0) by a score that is higher for non-members:
    P(a non-member outscores a member), ties counting half (the Mann-Whitney form of sklearn's roc_auc_score)."""
    from scipy.stats import rankdata

    n, m = len(members), len(nonmembers)
    if n == 0 or m == 0:
        raise ValueError("an AUC needs members and non-members")
    ranks = rankdata(np.concatenate([np.asarray(members, float), np.asarray(nonmembers, float)]))
    return float((ranks[n:].sum() - m * (m + 1) / 2) / (n * m))


def two_sample_bootstrap(members: Sequence[Sequence[float]], nonmembers: Sequence[Sequence[float]],
                         statistic: Callable[[Rows, Rows], float], level: float = 0.95, resamples: int = 2000,
                         seed: int = 0) -> Interval:
    """Percentile bootstrap of a statistic of two groups of items (an AUC: members and non-members), each group
    resampled within itself so both keep their sizes; columns are what each item carries (one score per model), so
    statistics of several models are resampled on the same items. Undefined resamples count as in `bootstrap`."""
    a, b = np.asarray(members, dtype=float), np.asarray(nonmembers, dtype=float)
    a, b = (x[:, None] if x.ndim == 1 else x for x in (a, b))
    value = float(statistic(a, b))
    rng = np.random.default_rng(seed)
    draws = [statistic(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
             for _ in range(resamples)]
    return percentile_interval(value, draws, len(a) + len(b), level, degenerate=min(len(a), len(b)) < 2)


def over_seeds(groups: Sequence[Sequence[Sequence[float]] | Sequence[float]], statistic: Callable[[Rows], float] | None
               = None, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """The mean over seeds of a per-seed statistic of that seed's items, with a two-level percentile bootstrap
    interval: each resample draws seeds with replacement, then items with replacement within every drawn seed, so the
    interval holds both the seed-to-seed spread and each seed's item sampling. `n` is the number of seeds; with one
    seed only its items are resampled. Resamples with an undefined (nan) statistic count as in `bootstrap`."""
    data = [np.asarray(g, dtype=float) for g in groups]
    data = [g[:, None] if g.ndim == 1 else g for g in data]
    if not data or any(len(g) == 0 for g in data):
        raise ValueError("every seed needs at least one item")
    stat = statistic or (lambda d: float(d[:, 0].mean()))
    value = float(np.mean([stat(g) for g in data]))
    rng = np.random.default_rng(seed)
    k = len(data)
    draws = np.empty(resamples)
    for r in range(resamples):
        picked = rng.integers(0, k, k) if k > 1 else [0]
        draws[r] = np.mean([stat(data[j][rng.integers(0, len(data[j]), len(data[j]))]) for j in picked])
    return percentile_interval(value, draws, k, level, degenerate=k == 1 and len(data[0]) == 1)
