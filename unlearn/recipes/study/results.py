"""A study's numbers: one row per cell and attack (results.csv), and the aggregates over seeds with intervals.

A cell is one run (method × optimizer × seed) and the attacks made on it. Everything is read back from the run
folders (metrics.json, items.json, attacks/*/), so a study folder received from someone else summarizes the same
way. Aggregates are means over seeds with a 95 % two-level bootstrap interval (seeds, then the items within each:
`unlearn.evaluation.stats.over_seeds`); comparisons between optimizers are paired (same seeds, same items) and
called "within noise" when their interval holds 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unlearn.evaluation.stats import (
    Interval,
    WorstCase,
    bootstrap,
    over_seeds,
    percentile_interval,
    recovery_of_means,
    simultaneous_level,
    worst_case,
)
from unlearn.storage.metrics import Metric
from unlearn.storage.records import ITEMS_FILE, AttackRecord, RunRecord, describe_lr, read_attack, read_items, read_run
from unlearn.training.config import read_yaml

NO_ATTACK = "none"


@dataclass
class CellResult:
    """One finished cell as read from its run folder."""

    name: str
    method: str  # the study's labels
    optimizer: str
    seed: int
    record: RunRecord
    config: dict[str, Any]
    items: dict[str, Any]  # the run's items.json
    attacks: dict[str, tuple[AttackRecord, dict[str, Any]]] = field(default_factory=dict)  # label -> (record, items)


def read_cell(run_dir: Path, method: str, optimizer: str, seed: int, attack_folders: dict[str, str]) -> CellResult:
    """The cell's run and those of its attacks that are complete (label -> folder under attacks/)."""
    cell = CellResult(run_dir.name, method, optimizer, seed, read_run(run_dir / "metrics.json"),
                      read_yaml(run_dir / "config.yaml"), read_items(run_dir / ITEMS_FILE))
    for label, folder in attack_folders.items():
        path = run_dir / "attacks" / folder
        if (path / "metrics.json").is_file():
            cell.attacks[label] = (read_attack(path / "metrics.json", folder), read_items(path / ITEMS_FILE))
    return cell


def _declared(cells: list[CellResult]) -> list[Metric]:
    seen: dict[str, Metric] = {}
    for cell in cells:
        for m in cell.record.declared:
            seen.setdefault(m.key, m)
    return list(seen.values())


def results_rows(cells: list[CellResult], attack_labels: list[str]) -> list[dict[str, Any]]:
    """results.csv: per cell one row without attack (the unlearned model) and one per attack made on it."""
    declared = [m for m in _declared(cells) if m.role in ("forget", "utility")]
    rows = []
    for cell in cells:
        r, train = cell.record, cell.record.train
        config_train = cell.config.get("train") if isinstance(cell.config.get("train"), dict) else {}
        base = {"cell": cell.name, "method": cell.method, "optimizer": cell.optimizer, "seed": cell.seed,
                "lr": describe_lr(cell.config.get("optimizer")), "lora_rank": config_train.get("lora_rank"),
                "max_steps": config_train.get("max_steps"), "steps": train.get("steps"),
                "stop_at": train.get("stop_at"), "reached": train.get("reached"),
                "stopped_at": train.get("stopped_at"), "forward_passes": train.get("forward_passes"),
                "seconds": train.get("seconds"), "collapsed": r.collapsed,
                **{m.key: r.metrics.get(m.key) for m in declared},
                **{f"target {m.key}": r.target.get(m.key) for m in declared if m.role == "forget"}}
        rows.append(base | {"attack": NO_ATTACK})
        for label in attack_labels:
            if label not in cell.attacks:
                continue
            record, _ = cell.attacks[label]
            row = base | {"attack": label, "attack_folder": record.attack, "attack_seconds": record.seconds}
            for rec in record.every_recovery:
                row |= {f"recovery {rec.metric}": rec.ratio, f"recovery {rec.metric} low": rec.low,
                        f"recovery {rec.metric} high": rec.high, f"recovery {rec.metric} n": rec.n,
                        f"attacked {rec.metric}": rec.attacked,
                        f"recovery {rec.metric} note": None if rec.note == "ok" else rec.note}
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ aggregates


@dataclass
class Aggregate:
    interval: Interval
    per_seed: list[float]
    items: bool  # whether items were resampled (else seeds only)


def _rows_of(values: list[float] | None, fallback: float | None) -> np.ndarray | None:
    if values:
        return np.asarray(values, dtype=float)[:, None]
    if fallback is not None and math.isfinite(fallback):
        return np.asarray([[fallback]])
    return None


def metric_aggregate(cells: list[CellResult], key: str) -> Aggregate | None:
    """The unlearned models' `key` over the cells' seeds, items resampled when every cell recorded them."""
    groups = []
    itemized = all(cell.items.get("unlearned", {}).get(key) for cell in cells)
    for cell in cells:
        rows = _rows_of(cell.items.get("unlearned", {}).get(key) if itemized else None, cell.record.metrics.get(key))
        if rows is None:
            return None
        groups.append(rows)
    return _aggregate(groups, mean_of, itemized)


def _aggregate(groups: list[np.ndarray], statistic: Callable[[np.ndarray], float], itemized: bool,
               level: float = 0.95) -> Aggregate:
    """Items recorded: the two-level interval (seeds and items). Else one value per seed, resampled over seeds."""
    per_seed = [statistic(g) for g in groups]
    interval = over_seeds(groups, statistic, level) if itemized else bootstrap(per_seed, level=level)
    return Aggregate(interval, per_seed, itemized)


def _recovery_rows(cell: CellResult, label: str, metric: str) -> tuple[np.ndarray | None, float | None, str]:
    record, items = cell.attacks[label]
    rec = next((r for r in record.every_recovery if r.metric == metric), None)
    if rec is None:
        return None, None, "lower"
    vectors = (items.get("recovery") or {}).get(metric)
    better = next((m.better for m in [*record.curve_metrics, *cell.record.declared] if m.key == metric), "lower")
    if vectors and all(k in vectors for k in ("target", "unlearned", "attacked")):
        return np.column_stack([vectors["target"], vectors["unlearned"], vectors["attacked"]]), rec.ratio, better
    return None, rec.ratio, better


def recovery_aggregate(cells: list[CellResult], label: str, metric: str, level: float = 0.95) -> Aggregate | None:
    """Mean recovery ratio on `metric` after attack `label` over the seeds of the cells that were attacked (a cell
    that missed the matched level is not; the tables say how many were); None where any ratio is undefined."""
    parts = [_recovery_rows(cell, label, metric) for cell in cells if label in cell.attacks]
    if not parts or any(ratio is None for _, ratio, _ in parts):
        return None
    better = parts[0][2]
    if all(rows is not None for rows, _, _ in parts):
        return _aggregate([rows for rows, _, _ in parts], lambda d: recovery_of_means(d, better), True, level)
    return _aggregate([np.asarray([[ratio]]) for _, ratio, _ in parts], lambda d: float(d[0, 0]), False, level)


# ------------------------------------------------------------------------------------------------ worst case


@dataclass
class WorstOfGroup:
    """One method × optimizer's worst case: each member's mean recovery over seeds (on the member's first recovery
    metric) with its interval at the Bonferroni level, and the largest with the max-of-bounds interval."""

    worst: WorstCase | None
    members: dict[str, Aggregate | None]


def worst_aggregate(cells: list[CellResult], labels: list[str]) -> WorstOfGroup:
    level = simultaneous_level(len(labels))
    members: dict[str, Aggregate | None] = {}
    for label in labels:
        metrics = recovery_metrics(cells, label)
        members[label] = recovery_aggregate(cells, label, metrics[0], level) if metrics else None
    defined = {k: a.interval for k, a in members.items() if a is not None and math.isfinite(a.interval.value)}
    return WorstOfGroup(worst_case(defined) if defined else None, members)


def worst_difference(mine: list[CellResult], reference: list[CellResult], labels: list[str], resamples: int = 2000,
                     seed: int = 0) -> Difference | None:
    """Paired difference of the worst case (this optimizer − the reference): each resample draws seeds, then items
    within each seed and member (the same for both optimizers), and takes each side's largest member mean anew, so
    the interval holds the chance of which member comes out largest. None when a member lacks per-item values or a
    recovery for some shared seed."""
    by_seed = {c.seed: c for c in reference}
    pairs = [(c, by_seed[c.seed]) for c in mine if c.seed in by_seed]
    if not pairs:
        return None
    data: list[list[tuple[np.ndarray, np.ndarray, str]]] = []  # per seed, per member: (mine rows, ref rows, better)
    for a, b in pairs:
        row = []
        for label in labels:
            metrics = recovery_metrics([a, b], label)
            if not metrics or label not in a.attacks or label not in b.attacks:
                return None
            rows_a, ratio_a, better = _recovery_rows(a, label, metrics[0])
            rows_b, ratio_b, _ = _recovery_rows(b, label, metrics[0])
            if rows_a is None or rows_b is None or len(rows_a) != len(rows_b) or ratio_a is None or ratio_b is None:
                return None
            row.append((rows_a, rows_b, better))
        data.append(row)

    def worst_gap(draw: list[tuple[int, list[np.ndarray]]]) -> float:
        means = np.array([[[recovery_of_means(data[s][m][side][idx[m]], data[s][m][2]) for side in (0, 1)]
                           for m in range(len(labels))] for s, idx in draw])  # seeds x members x sides
        per_member = np.nanmean(means, axis=0) if np.isfinite(means).all() else np.full((len(labels), 2), np.nan)
        return float(per_member[:, 0].max() - per_member[:, 1].max())

    full = [(s, [np.arange(len(m[0])) for m in row]) for s, row in enumerate(data)]
    value = worst_gap(full)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        picked = rng.integers(0, len(data), len(data)) if len(data) > 1 else [0]
        draws.append(worst_gap([(int(s), [rng.integers(0, len(m[0]), len(m[0])) for m in data[s]])
                                for s in picked]))
    return Difference(percentile_interval(value, draws, len(data)))


def recovery_metrics(cells: list[CellResult], label: str) -> list[str]:
    keys: list[str] = []
    for cell in cells:
        if label in cell.attacks:
            record = cell.attacks[label][0]
            keys += [r.metric for r in record.every_recovery if r.metric not in keys]
    return keys


@dataclass
class Difference:
    """Paired difference (this optimizer − the reference) over shared seeds and items."""

    interval: Interval

    @property
    def verdict(self) -> str:
        low, high = self.interval.low, self.interval.high
        if not (math.isfinite(low) and math.isfinite(high)):
            return "no interval"
        # With one seed the interval holds the item sampling only, not the seed-to-seed spread: said with the verdict.
        caveat = " (one seed: item noise only)" if self.interval.n == 1 else ""
        if low > 0:
            return "higher (beyond noise)" + caveat
        if high < 0:
            return "lower (beyond noise)" + caveat
        return "within noise" + caveat


def paired_difference(mine: list[CellResult], reference: list[CellResult], rows: Callable[[CellResult], Any],
                      statistic: Callable[[np.ndarray], float],
                      takes_part: Callable[[CellResult], bool] | None = None) -> Difference | None:
    """Cells paired by seed; `rows(cell)` gives that cell's per-item rows. Items are resampled jointly for both
    (they are the same facts: the same benchmark, and for relearning the same held-out split, which follows the
    seed); seeds are resampled too. Every seed takes part unless `takes_part` says otherwise: a seed where either
    side does not (an attack not run on a cell that missed the matched level) is left out, and the difference's n
    says how many seeds were paired; one that takes part without per-item rows makes the difference undefined."""
    by_seed = {c.seed: c for c in reference}
    groups = []
    for cell in mine:
        other = by_seed.get(cell.seed)
        if other is None or (takes_part is not None and not (takes_part(cell) and takes_part(other))):
            continue
        a, b = rows(cell), rows(other)
        if a is None or b is None or len(a) != len(b):
            return None
        groups.append(np.hstack([a, b]))
    if not groups:
        return None
    width = groups[0].shape[1] // 2
    interval = over_seeds(groups, lambda d: statistic(d[:, :width]) - statistic(d[:, width:]))
    return Difference(interval)


def metric_rows(key: str) -> Callable[[CellResult], np.ndarray | None]:
    def rows(cell: CellResult) -> np.ndarray | None:
        values = cell.items.get("unlearned", {}).get(key)
        return np.asarray(values, dtype=float)[:, None] if values else None
    return rows


def attacked_by(label: str) -> Callable[[CellResult], bool]:
    """Whether a cell was attacked with `label` (one that missed the matched level is not, by default)."""
    return lambda cell: label in cell.attacks


def recovery_rows(label: str, metric: str) -> Callable[[CellResult], np.ndarray | None]:
    def rows(cell: CellResult) -> np.ndarray | None:
        return _recovery_rows(cell, label, metric)[0] if label in cell.attacks else None
    return rows


def mean_of(d: np.ndarray) -> float:
    return float(d[:, 0].mean())


def ratio_of(better: str) -> Callable[[np.ndarray], float]:
    return lambda d: recovery_of_means(d, better)
