"""Choosing each optimizer's learning rate (or another numeric option) for a study from a small grid of trial runs.

A study compares optimizers at a matched forget level (`train.stop_at`), and an lr picked by hand may reach that
level with needless damage, or not reach it at all. An optimizer entry with `calibrate: {lr: [1e-5, 2e-5, 4e-5]}`
runs one trial per value on a calibration seed that none of the compared cells uses (so the value is not chosen
on the very runs it is then judged by) and keeps:

1. among the trials that reached `stop_at` and did not collapse, the one with the best utility (the benchmark's
   first utility metric, or `calibrate_by`); ties go to fewer steps, then to the smaller value;
2. if none did, the trial that came closest to the level: the optimizer's cells are then run with it and reported
   as not at the matched level, as any run that misses it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from unlearn.core.errors import UserError
from unlearn.storage.records import RunRecord, is_number
from unlearn.training.stopping import StopRule


@dataclass(frozen=True)
class Trial:
    value: float
    record: RunRecord


@dataclass(frozen=True)
class Choice:
    value: float
    by: str | None  # the utility metric that decided among the trials that reached the level
    reached: bool  # whether the chosen trial reached stop_at
    reason: str


@dataclass(frozen=True)
class Calibrated:
    """A method × optimizer's calibration: its finished trials and the value chosen (None: no trial finished)."""

    method: str  # the study's labels
    optimizer: str
    option: str
    trials: list[Trial]
    choice: Choice | None


def utility_metric(records: list[RunRecord], by: str | None = None) -> tuple[str, str] | None:
    """(key, 'higher' | 'lower') of the utility metric the choice is made on: `by`, else the first declared utility
    metric every record has a number for."""
    for record in records:
        for metric in record.declared:
            if (metric.key == by if by else metric.role == "utility") and all(
                    _number(r.metrics.get(metric.key)) is not None for r in records):
                return metric.key, metric.better
    return None


def _number(value: object) -> float | None:
    return float(value) if is_number(value) and math.isfinite(value) else None


def _usable(trial: Trial) -> bool:
    return trial.record.train.get("reached") is True and not trial.record.collapsed


def choose(trials: list[Trial], by: str | None = None) -> Choice:
    if not trials:
        raise ValueError("no calibration trials to choose from")
    usable = [t for t in trials if _usable(t)]
    if usable:
        utility = utility_metric([t.record for t in usable], by)
        if utility is None and by:
            raise UserError(f"calibrate_by '{by}' is not a metric every calibration trial recorded")
        if utility is None:
            best = min(usable, key=lambda t: (t.record.train.get("steps") or 0, t.value))
            return Choice(best.value, None, True, "reached the level in the fewest steps (no utility metric)")
        key, better = utility
        sign = -1.0 if better == "higher" else 1.0
        best = min(usable, key=lambda t: (sign * float(t.record.metrics[key]), t.record.train.get("steps") or 0,
                                          t.value))
        return Choice(best.value, key, True, f"reached the level with the best {key}")
    rule_text = trials[0].record.train.get("stop_at")
    rule = StopRule.parse(rule_text) if isinstance(rule_text, str) else None

    def distance(trial: Trial) -> float:
        value = _number(trial.record.metrics.get(rule.metric)) if rule else None
        return math.inf if value is None or rule is None else abs(value - rule.level)

    best = min(trials, key=lambda t: (distance(t), t.value))
    return Choice(best.value, None, False, "no value reached the level without collapsing: the closest one is used")
