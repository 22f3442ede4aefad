"""Bootstrap intervals (unlearn/evaluation/stats.py) on distributions whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unlearn.evaluation.stats import bootstrap, over_seeds, recovery_interval, recovery_of_means, removal_beyond_noise


def test_mean_interval_matches_the_normal_theory_width_and_covers_the_truth() -> None:
    """n = 400 draws of N(0, 1): the 95 % interval of the mean is ±1.96/√400 ≈ ±0.098 around the sample mean."""
    sample = np.random.default_rng(1).normal(0.0, 1.0, 400)
    interval = bootstrap(sample, resamples=4000, seed=0)
    assert interval.n == 400 and interval.value == pytest.approx(sample.mean())
    assert interval.half_width == pytest.approx(1.96 * sample.std(ddof=1) / 20, rel=0.1)
    assert interval.low < interval.value < interval.high


def test_coverage_over_many_samples_is_near_the_nominal_level() -> None:
    """Across 200 independent samples of Bernoulli(0.3), n = 100, the 95 % interval holds 0.3 about 95 % of
    the time (a percentile bootstrap undercovers a little at this n: accept 88-99 %)."""
    rng = np.random.default_rng(7)
    hits = sum(bootstrap(rng.binomial(1, 0.3, 100), resamples=500, seed=k).contains(0.3) for k in range(200))
    assert 0.88 <= hits / 200 <= 0.99


def test_same_seed_same_interval_and_more_items_narrower() -> None:
    sample = np.random.default_rng(3).binomial(1, 0.5, 50)
    assert bootstrap(sample, seed=5) == bootstrap(sample, seed=5)
    wide = bootstrap(sample, seed=0)
    narrow = bootstrap(np.tile(sample, 16), seed=0)  # same proportion, 16x the items: ~1/4 of the width
    assert narrow.half_width == pytest.approx(wide.half_width / 4, rel=0.25)


def test_recovery_ratio_resamples_items_jointly() -> None:
    """Target knows all 200 items, unlearning removed 100 of them, the attack brought 25 of those back: the
    ratio is 0.25, and its interval (items resampled with all three columns together) is about ±0.085."""
    target = np.ones(200)
    unlearned = np.r_[np.ones(100), np.zeros(100)]
    attacked = np.r_[np.ones(100), np.ones(25), np.zeros(75)]
    rows = np.c_[target, unlearned, attacked]
    interval = bootstrap(rows, recovery_of_means, resamples=3000, seed=0)
    assert interval.value == pytest.approx(0.25)
    # Binomial theory for 25 of the ~100 forgotten items: 1.96·√(0.25·0.75/100) ≈ 0.085.
    assert interval.half_width == pytest.approx(0.085, rel=0.2)


def test_undefined_statistics_give_nan_not_a_fake_interval() -> None:
    nothing_forgotten = np.c_[np.ones(30), np.ones(30), np.ones(30)]
    interval = bootstrap(nothing_forgotten, recovery_of_means, resamples=200)
    assert math.isnan(interval.value) and math.isnan(interval.low) and math.isnan(interval.high)
    assert math.isnan(bootstrap([0.4]).low)  # one row: no spread to resample
    with pytest.raises(ValueError, match="no rows"):
        bootstrap([])
    with pytest.raises(ValueError, match="level"):
        bootstrap([1.0, 2.0], level=1.5)


def test_recovery_interval_over_items_is_about_the_ratio_and_narrows_with_items() -> None:
    """Target knows every item, unlearning removed 70 %, the attack brought 20 % of the items back: ratio 2/7;
    the interval holds it, and 4x the items halves its width (to bootstrap noise)."""
    def data(n: int) -> tuple[list[float], list[float], list[float]]:
        unlearned = [1.0 if i % 10 < 3 else 0.0 for i in range(n)]
        attacked = [1.0 if i % 10 < 5 else 0.0 for i in range(n)]
        return [1.0] * n, unlearned, attacked

    small, large = recovery_interval(*data(100)), recovery_interval(*data(400))
    assert small.value == pytest.approx(2 / 7) and large.value == pytest.approx(2 / 7)
    assert small.contains(2 / 7) and large.contains(2 / 7)
    assert large.half_width == pytest.approx(small.half_width / 2, rel=0.25)
    with pytest.raises(ValueError, match="unequal length"):
        recovery_interval([1.0], [0.0, 1.0], [1.0])


def test_over_seeds_holds_the_seed_spread_and_the_item_noise() -> None:
    """Three seeds whose item means are 0.2, 0.5 and 0.8 (n = 200 each): the mean is 0.5 and the interval is wide
    (seeds disagree), far wider than one seed's item interval; identical seeds give about the item-only width."""
    rng = np.random.default_rng(3)
    spread = [rng.binomial(1, p, 200) for p in (0.2, 0.5, 0.8)]
    wide = over_seeds(spread, seed=0)
    assert wide.n == 3 and wide.value == pytest.approx(np.mean([s.mean() for s in spread]))
    assert wide.contains(0.5) and wide.half_width > 0.15
    alike = over_seeds([rng.binomial(1, 0.5, 200) for _ in range(3)], seed=0)
    assert alike.half_width < 0.1
    single = over_seeds([spread[1]], seed=0)
    assert single.n == 1 and single.half_width == pytest.approx(bootstrap(spread[1], seed=0).half_width, rel=0.2)


def test_a_removal_inside_its_item_noise_is_told_apart_from_a_real_one() -> None:
    """Unlearning that moved 2 of 100 items is noise (its ratio could take any value); 70 of 100 is not."""
    target = [1.0] * 100
    assert not removal_beyond_noise(target, [0.0, 0.0] + [1.0] * 98)
    assert removal_beyond_noise(target, [0.0] * 70 + [1.0] * 30)
