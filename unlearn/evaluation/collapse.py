"""Collapse: a run that wrecked the model instead of unlearning.

Forgetting is cheap when everything else goes too: a model whose retain accuracy fell below what guessing scores,
or whose perplexity grew by orders of magnitude, also "forgets" (the ZO runs that blew up measured forget 0.173
at perplexity 6.7e9). Such a run is flagged, so no table reads it as a success and no attack's recovery ratio on
it is taken for a robustness finding. Judged from the declared utility metrics only (their `chance`, and their
unit for perplexity), so no benchmark is named here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from unlearn.storage.metrics import Metric

PERPLEXITY = "perplexity"  # the unit a perplexity metric declares


def collapse_reasons(metrics: dict[str, float], target: dict[str, float], declared: Iterable[Metric],
                     perplexity_ratio: float) -> list[str]:
    """Why the run counts as collapsed (empty: it did not): a utility metric below chance, or a perplexity above
    `perplexity_ratio` times the starting model's (or not finite)."""
    reasons = []
    for metric in declared:
        value = metrics.get(metric.key)
        if metric.role != "utility" or not isinstance(value, int | float):
            continue
        if metric.chance is not None and value < metric.chance:
            reasons.append(f"{metric.title} {value:.3f} is below chance ({metric.chance:g})")
        if metric.unit == PERPLEXITY:
            base = target.get(metric.key)
            if not math.isfinite(value):
                reasons.append(f"{metric.title} is {value}")
            elif isinstance(base, int | float) and base > 0 and value > perplexity_ratio * base:
                reasons.append(f"{metric.title} {value:.4g} is over {perplexity_ratio:g}x the starting model's "
                               f"{base:.4g}")
    return reasons


def collapse_warning(reasons: list[str]) -> str:
    return "warning: this run collapsed (" + "; ".join(reasons) + "): its forgetting is the model's destruction"


COLLAPSED_NOTE = "the run collapsed: a recovery ratio on it measures the destruction, not robustness"
