"""A study's summary.md and plots, from its finished cells (unlearn/recipes/study/results.py does the statistics).

Every number in the summary is a mean over seeds with its 95 % interval and n; a comparison with the reference
optimizer is a paired difference, and it is "within noise" whenever its interval holds 0.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unlearn.core.files import write_atomic
from unlearn.evaluation.stats import Interval, simultaneous_level
from unlearn.recipes.study.calibration import Calibrated, utility_metric
from unlearn.recipes.study.results import (
    Aggregate,
    CellResult,
    attacked_by,
    mean_of,
    metric_aggregate,
    metric_rows,
    paired_difference,
    ratio_of,
    recovery_aggregate,
    recovery_metrics,
    recovery_rows,
    worst_aggregate,
    worst_difference,
)
from unlearn.storage.metrics import Metric
from unlearn.storage.records import describe_lr, is_number

if TYPE_CHECKING:
    from unlearn.recipes.study.plan import Study


def csv_text(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([["" if row.get(k) is None else row.get(k) for k in columns] for row in rows])
    return buffer.getvalue()


def _interval(interval: Interval | None) -> str:
    if interval is None or not math.isfinite(interval.value):
        return "n/a"
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return f"{interval.value:.3f} (no interval)"
    return f"{interval.value:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def _cell(aggregate: Aggregate | None) -> str:
    return _interval(aggregate.interval if aggregate else None)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def clean(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(clean(c) for c in row) + " |" for row in rows], ""]


def _declarations(cells: list[CellResult]) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for cell in cells:
        for m in cell.record.declared:
            out.setdefault(m.key, m)
        for record, _ in cell.attacks.values():
            for m in record.curve_metrics:
                out.setdefault(m.key, m)
    return out


def _title(declared: dict[str, Metric], key: str) -> str:
    metric = declared.get(key)
    return metric.heading if metric else key


def summarized_metrics(cells: list[CellResult]) -> tuple[str, list[str], list[str]]:
    """(headline, forget metrics, utility metrics) the summary shows: the declared forget and utility metrics with
    values (those recorded per item first, so intervals hold the item noise)."""
    declared = _declarations(cells)
    headline = cells[0].record.headline
    present = [k for k, m in declared.items() if m.role in ("forget", "utility")
               and all(isinstance(c.record.metrics.get(k), int | float) for c in cells)]
    forget = [k for k in present if declared[k].role == "forget"]
    utility = [k for k in present if declared[k].role == "utility"]
    return headline, forget, utility


def _groups(study: Study, cells: list[CellResult]) -> list[tuple[str, str, list[CellResult]]]:
    out = []
    for method in study.methods:
        for optimizer in study.optimizers:
            group = [c for c in cells if c.method == method.label and c.optimizer == optimizer.label]
            if group:
                out.append((method.label, optimizer.label, group))
    return out


def summary_markdown(study: Study, cells: list[CellResult], failures: dict[str, str], images: list[Path],
                     calibrations: Sequence[Calibrated] = ()) -> str:
    name = study.folder.name
    lines = [f"# Study `{name}`", "",
             f"Command: `unlearn study {study.path}` · seeds {study.settings.seeds} · "
             f"{len(cells)}/{len(study.cells)} cells complete · attacks: "
             + (", ".join(f"{a.label} ({a.name})" for a in study.attacks) or "none"), "",
             "Each value is the mean over the cells' seeds (n) with its 95 % bootstrap interval in brackets: seeds are "
             "resampled, then the items within each seed, so the interval holds both the seed-to-seed spread and the "
             "item sampling (metrics recorded only as one number per run are resampled over seeds alone). A "
             "difference whose interval holds 0 is within noise.", ""]
    lines += _calibration_table(study, calibrations)
    if not cells:
        return "\n".join([*lines, "No cell is complete yet.", ""])
    declared = _declarations(cells)
    headline, forget, utility = summarized_metrics(cells)
    groups = _groups(study, cells)

    lines += ["## Forget level, utility and cost", ""]
    header = ["method", "optimizer", "lr", "n", "reached stop_at", "steps", *[_title(declared, k) for k in forget],
              *[_title(declared, k) for k in utility], "forwards", "seconds", "collapsed"]
    rows = []
    for method, optimizer, group in groups:
        reached = [c.record.train.get("reached") for c in group]
        steps = [c.record.train.get("steps") for c in group]
        forwards = [c.record.train.get("forward_passes") for c in group]
        seconds = [c.record.train.get("seconds") for c in group]
        rows.append([method, optimizer, describe_lr(group[0].config.get("optimizer")), str(len(group)),
                     "—" if all(r is None for r in reached) else f"{sum(bool(r) for r in reached)}/{len(group)}",
                     _mean_text(steps), *[_cell(metric_aggregate(group, k)) for k in forget + utility],
                     _mean_text(forwards), _mean_text(seconds, 1), str(sum(c.record.collapsed for c in group))])
    lines += _table(header, rows)
    unreached = [c.name for c in cells if c.record.train.get("reached") is False]
    if unreached:
        what = ("Their attacks are shown, but they are not at the matched level." if study.settings.attack_unmatched
                else "They are not attacked, since they are not at the matched level; `attack_unmatched: true` "
                     "attacks them anyway.")
        lines += [f"Runs that never reached `{cells[0].record.train.get('stop_at')}`: {', '.join(unreached)}. {what}",
                  ""]

    for attack in study.attacks:
        metrics = recovery_metrics(cells, attack.label)
        if not metrics:
            continue
        lines += [f"## Recovery after `{attack.label}`", "",
                  "Recovery ratio = (attacked − unlearned) / (target − unlearned): 0 = nothing came back, 1 = all.", ""]
        header = ["method", "optimizer", "n", *[f"recovery on {_title(declared, k)}" for k in metrics]]
        rows = [[method, optimizer, str(sum(attack.label in c.attacks for c in group)),
                 *[_cell(recovery_aggregate(group, attack.label, k)) for k in metrics]]
                for method, optimizer, group in groups]
        lines += _table(header, rows)

    for name, labels in study.worst_cases.items():
        lines += _worst_table(name, labels, groups)
    lines += _comparisons(study, cells, declared, headline, forget, utility)
    if images:
        lines += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in images], ""]
    missing = [c.name for c in study.cells if c.name not in {x.name for x in cells}]
    if failures:
        lines += ["## Failures", "", *[f"- {where}: {why}" for where, why in failures.items()], ""]
    if missing:
        lines += [f"Not complete: {', '.join(missing)}.", ""]
    return "\n".join(lines)


def _worst_table(name: str, labels: list[str], groups: list[tuple[str, str, list[CellResult]]]) -> list[str]:
    each = simultaneous_level(len(labels))
    lines = [f"## Worst case `{name}`", "",
             f"The largest mean recovery over {len(labels)} attacks ({', '.join(labels)}), each on its own first "
             "recovery metric. A robustness claim is only as strong as the attack that failed to break it. Every "
             f"member's interval here is at the {each:.2%} level (Bonferroni: all {len(labels)} hold at once with "
             ">= 95 %), and the worst case's interval runs from the largest lower to the largest upper bound, so it "
             "accounts for having picked the largest.", ""]
    header = ["method", "optimizer", "n", "worst attack", "worst recovery", *labels]
    rows = []
    for method, optimizer, group in groups:
        result = worst_aggregate(group, labels)
        worst = result.worst
        rows.append([method, optimizer, str(len(group)), worst.member if worst else "n/a",
                     _interval(Interval(worst.value, worst.low, worst.high, len(group))) if worst else "n/a",
                     *[_cell(result.members[label]) for label in labels]])
    return lines + _table(header, rows)


def _calibration_table(study: Study, calibrations: Sequence[Calibrated]) -> list[str]:
    if not calibrations:
        return []
    lines = ["## Calibration", "",
             f"One trial per value on seed {study.settings.trial_seed}, which no compared cell uses. Kept: among the "
             "trials that reached stop_at without collapsing, the best utility (ties: fewer steps); if none did, the "
             "one closest to the level (unlearn/recipes/study/calibration.py). Each trial is one run: a choice between "
             "values whose utilities differ by less than their noise is arbitrary, not evidence.", ""]
    records = [t.record for c in calibrations for t in c.trials]
    utility = utility_metric(records, study.settings.calibrate_by) if records else None
    shown = [k for k in (records[0].headline if records else None, utility[0] if utility else None) if k]
    declared = {m.key: m for r in records for m in r.declared}
    header = ["method", "optimizer", "value", "reached stop_at", "steps", *[_title(declared, k) for k in shown],
              "collapsed", "kept"]
    rows = []
    for calibration in calibrations:
        choice = calibration.choice
        for trial in calibration.trials:
            train = trial.record.train
            rows.append([calibration.method, calibration.optimizer, f"{calibration.option} {trial.value:g}",
                         {True: "yes", False: "no"}.get(train.get("reached"), "—"), str(train.get("steps", "n/a")),
                         *[_number_text(trial.record.metrics.get(k)) for k in shown],
                         "yes" if trial.record.collapsed else "no",
                         f"✓ {choice.reason}" if choice is not None and choice.value == trial.value else ""])
        if not calibration.trials:
            rows.append([calibration.method, calibration.optimizer, calibration.option, "—", "—",
                         *["" for _ in shown], "—", "no trial finished"])
    return lines + _table(header, rows)


def _number_text(value: Any) -> str:
    return f"{value:.3f}" if is_number(value) else "n/a"


def _mean_text(values: list[Any], digits: int = 0) -> str:
    numbers = [v for v in values if is_number(v)]
    if not numbers:
        return "n/a"
    return f"{sum(numbers) / len(numbers):.{digits}f}"


def _differences(study: Study, mine: list[CellResult], ref: list[CellResult], declared: dict[str, Metric],
                 headline: str, forget: list[str], utility: list[str]) -> list[tuple[str, Any]]:
    """(quantity, paired difference mine − ref) for every metric, every attack's recovery and every worst case; the
    differences that are undefined for some seed (a ratio with nothing to recover) are left out."""
    quantities = [(f"{_title(declared, k)} (unlearned)", metric_rows(k), mean_of, None)
                  for k in [headline, *[f for f in forget if f != headline], *utility]]
    for attack in study.attacks:
        for key in recovery_metrics(mine + ref, attack.label):
            better = declared[key].better if key in declared else "lower"
            quantities.append((f"recovery on {_title(declared, key)} after {attack.label}",
                               recovery_rows(attack.label, key), ratio_of(better), attacked_by(attack.label)))
    differences = [(title, paired_difference(mine, ref, rows_of, statistic, takes_part))
                   for title, rows_of, statistic, takes_part in quantities]
    differences += [(f"worst-case recovery `{name}`", worst_difference(mine, ref, labels))
                    for name, labels in study.worst_cases.items()]
    return [(title, diff) for title, diff in differences
            if diff is not None and math.isfinite(diff.interval.value)]


def _comparisons(study: Study, cells: list[CellResult], declared: dict[str, Metric], headline: str,
                 forget: list[str], utility: list[str]) -> list[str]:
    def group(method: str, optimizer: str) -> list[CellResult]:
        return [c for c in cells if c.method == method and c.optimizer == optimizer]

    reference = study.settings.compare_to or study.optimizers[0].label
    rows = []
    for method in study.methods:
        ref = group(method.label, reference)
        if not ref:
            continue
        for optimizer in study.optimizers:
            if optimizer.label == reference:
                continue
            for title, diff in _differences(study, group(method.label, optimizer.label), ref, declared, headline,
                                            forget, utility):
                rows.append([method.label, optimizer.label, title, _interval(diff.interval), str(diff.interval.n),
                             diff.verdict])
    lines: list[str] = []
    if rows:
        lines += [f"## Compared with `{reference}` (paired: same seeds, same items)", "",
                  "Δ = this optimizer − the reference, mean over the shared seeds with its 95 % interval.", ""]
        lines += _table(["method", "optimizer", "quantity", "Δ [95 % interval]", "n seeds", "verdict"], rows)
    rows = []
    for mine_label, ref_label in study.settings.contrasts:
        mine, ref = group(*mine_label.split("/", 1)), group(*ref_label.split("/", 1))
        if mine and ref:
            rows += [[mine_label, ref_label, title, _interval(diff.interval), str(diff.interval.n), diff.verdict]
                     for title, diff in _differences(study, mine, ref, declared, headline, forget, utility)]
    if rows:
        lines += ["## Contrasts across methods (paired: same seeds, same items)", "",
                  "Δ = A − B, mean over the shared seeds with its 95 % interval.", ""]
        lines += _table(["A", "B", "quantity", "Δ [95 % interval]", "n seeds", "verdict"], rows)
    return lines


# ------------------------------------------------------------------------------------------------ plots


def plots(study: Study, cells: list[CellResult], folder: Path) -> list[Path]:
    """recovery_vs_forget.png, relearn_curves.png and utility_vs_forget.png (those there is data for)."""
    if not cells:
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    declared = _declarations(cells)
    headline, _, utility = summarized_metrics(cells)
    groups = _groups(study, cells)
    colours = {o.label: plt.get_cmap("tab10")(i % 10) for i, o in enumerate(study.optimizers)}
    markers = {m.label: "osD^v<>"[i % 7] for i, m in enumerate(study.methods)}
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = folder / name
        fig.tight_layout()
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        written.append(path)

    def errorbar(ax: Any, x: Aggregate | None, y: Aggregate | None, method: str, optimizer: str) -> None:
        if x is None or y is None or not (math.isfinite(x.interval.value) and math.isfinite(y.interval.value)):
            return
        xi, yi = x.interval, y.interval
        xerr = [[max(xi.value - xi.low, 0)], [max(xi.high - xi.value, 0)]] if math.isfinite(xi.low) else None
        yerr = [[max(yi.value - yi.low, 0)], [max(yi.high - yi.value, 0)]] if math.isfinite(yi.low) else None
        ax.errorbar([xi.value], [yi.value], xerr=xerr, yerr=yerr, fmt=markers[method], color=colours[optimizer],
                    capsize=3, label=f"{method} × {optimizer}")
        ax.scatter(x.per_seed, y.per_seed, color=colours[optimizer], alpha=0.3, s=12)

    attacks = [a for a in study.attacks if recovery_metrics(cells, a.label)]
    if attacks:
        fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.8), squeeze=False)
        for ax, attack in zip(axes[0], attacks, strict=True):
            key = recovery_metrics(cells, attack.label)[0]
            for method, optimizer, group in groups:
                # The level of the cells this attack was run on (a cell that missed the matched level was not).
                attacked = [c for c in group if attack.label in c.attacks]
                errorbar(ax, metric_aggregate(attacked, headline), recovery_aggregate(attacked, attack.label, key),
                         method, optimizer)
            ax.axhline(0, color="grey", lw=0.6)
            ax.set_xlabel(f"{_title(declared, headline)} after unlearning")
            ax.set_ylabel(f"recovery on {_title(declared, key)}")
            ax.set_title(attack.label)
        _legend(axes[0][0])
        save(fig, "recovery_vs_forget.png")

    curved = [a for a in study.attacks if any(a.label in c.attacks and c.attacks[a.label][0].curve for c in cells)]
    if curved:
        fig, axes = plt.subplots(1, len(curved), figsize=(4.5 * len(curved), 3.8), squeeze=False)
        for ax, attack in zip(axes[0], curved, strict=True):
            key = None
            for method, optimizer, group in groups:
                curves = [c.attacks[attack.label][0] for c in group if attack.label in c.attacks]
                curves = [r for r in curves if r.curve and r.curve_metric]
                if not curves:
                    continue
                key = curves[0].curve_metric
                steps = sorted({p["step"] for r in curves for p in r.curve or []})
                series = [[next((p[key] for p in r.curve or [] if p["step"] == s), math.nan) for s in steps]
                          for r in curves]
                values = np.asarray(series, dtype=float)
                mean = np.nanmean(values, axis=0)
                ax.plot(steps, mean, marker=markers[method], color=colours[optimizer], label=f"{method} × {optimizer}")
                ax.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=colours[optimizer],
                                alpha=0.15)
            ax.set_xlabel("attack steps")
            ax.set_ylabel(_title(declared, key) if key else "")
            ax.set_title(f"{attack.label}: mean, band = range over seeds")
        _legend(axes[0][0])
        save(fig, "relearn_curves.png")

    if utility:
        fig, ax = plt.subplots(figsize=(5, 4))
        for method, optimizer, group in groups:
            errorbar(ax, metric_aggregate(group, headline), metric_aggregate(group, utility[0]), method, optimizer)
        ax.set_xlabel(f"{_title(declared, headline)} after unlearning")
        ax.set_ylabel(_title(declared, utility[0]))
        ax.set_title("utility against forgetting (dots: seeds)")
        _legend(ax)
        save(fig, "utility_vs_forget.png")
    return written


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing plotted (every value undefined): no empty legend
        ax.legend(fontsize=7)
