"""Report tables: one row per run folder, one row per attack result, as Markdown (printed) and CSV (written).

Everything is read from the records (unlearn/storage/records.py) and their metric declarations, so the report names
no benchmark and no attack:
- runs table: the run's declared metrics (a column appears once some run has a value in it), and for every
  attack folder found under any run's attacks/, the run's headline metric after that attack;
- attacks table: every attack folder of every run, with its settings, the metric recovery is measured on,
  its value unlearned / attacked / at the target, and the recovery ratio;
- per concept: the headline metric per tag, when the questions are tagged;
- curves: every attack that measured repeatedly (relearning), one panel per measured metric.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn.core.errors import UserError
from unlearn.core.files import write_atomic, write_text_atomic
from unlearn.storage.locks import Busy, hold
from unlearn.storage.metrics import Metric, declaration
from unlearn.storage.records import AttackRecord, RunRecord, describe_lr, read_attack, read_run
from unlearn.training.config import read_yaml


@dataclass
class Found:
    name: str
    record: RunRecord
    attacks: list[AttackRecord]
    config: dict[str, Any] = field(default_factory=dict)  # the run's config.yaml (read as data: lr, LoRA rank)


def _folders(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_runs(runs_dir: Path, notes: list[str] | None = None) -> list[Found]:
    """Every finished run under `runs_dir`, each read while held (so none is replaced half-read); a run another
    process is writing right now is left out, with a note in `notes`."""
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UserError(f"runs folder {runs_dir} is a file, not a folder")
    if not runs_dir.is_dir():
        raise UserError(f"runs folder {runs_dir} does not exist")
    found = []
    for folder in _folders(runs_dir):
        try:
            with hold(folder):
                run = _read_found(folder)
        except Busy as err:
            if notes is not None:
                notes.append(f"left out {folder.name}: {err}")
            continue
        if run is not None:
            found.append(run)
    if not found:
        raise UserError(f"no runs with metrics.json under {runs_dir}")
    return found


def _read_found(folder: Path) -> Found | None:
    if not (folder / "metrics.json").is_file():
        return None
    attacks_dir = folder / "attacks"
    attacks = [read_attack(a / "metrics.json", a.name) for a in _folders(attacks_dir)
               if (a / "metrics.json").is_file()] if attacks_dir.is_dir() else []
    config = read_yaml(folder / "config.yaml") if (folder / "config.yaml").is_file() else {}
    return Found(folder.name, read_run(folder / "metrics.json"), attacks, config)


def check_csv_path(csv_path: Path) -> None:
    """The --csv file can be written: checked before any work (a folder or a missing folder is one line)."""
    if csv_path.is_dir():
        raise UserError(f"--csv {csv_path} is a folder; give a file name (e.g. {csv_path / 'report.csv'})")
    if not csv_path.parent.is_dir():
        raise UserError(f"--csv: folder {csv_path.parent} does not exist")


def _declared(record: RunRecord) -> list[Metric]:
    """The run's declarations; a record written before runs declared their metrics gets plain ones (its key
    as the title, no direction) for its top-level keys."""
    if record.declared:
        return record.declared
    return [Metric(k, k, "none", "forget" if k == record.headline else "info") for k in record.metrics
            if k.count("/") <= 1]


def _heading(metric: Metric | None, key: str) -> str:
    return metric.heading if metric is not None else key


# ------------------------------------------------------------------------------------------------ tables


@dataclass
class Table:
    columns: list[tuple[str, str]]  # (key, title)
    rows: list[dict[str, Any]]

    def shown(self, always: set[str]) -> list[tuple[str, str]]:
        """A column appears once some row has a value in it: no walls of n/a."""
        return [(k, t) for k, t in self.columns if k in always or any(r.get(k) is not None for r in self.rows)]


ALWAYS = {"run", "method", "optimizer", "attack"}


def runs_table(found: list[Found]) -> Table:
    metrics: dict[str, Metric] = {}
    for item in found:
        for m in _declared(item.record):
            metrics.setdefault(m.key, m)
    attack_names = sorted({a.attack for item in found for a in item.attacks})
    columns = [("run", "run"), ("benchmark", "benchmark"), ("method", "method"), ("optimizer", "optimizer"),
               ("lr", "lr"), ("lora_rank", "LoRA rank"),
               *[(k, m.heading) for k, m in metrics.items()], ("steps", "steps"), ("seconds", "seconds"),
               ("collapsed", "collapsed"),
               *[column for a in attack_names for column in ((f"attack/{a}", f"after {a}"),
                                                            (f"recovery/{a}", f"recovery {a}"))]]
    any_collapsed = any(item.record.collapsed for item in found)  # the column appears only then
    rows: list[dict[str, Any]] = []
    before: dict[str, dict[str, Any]] = {}
    for item in found:
        r = item.record
        if r.target:  # each distinct starting point once
            key = json.dumps([r.benchmark, r.target], sort_keys=True, default=str)
            before.setdefault(key, {"run": "(before unlearning)", "benchmark": r.benchmark, "method": "—",
                                    "optimizer": "—", **{k: r.target.get(k) for k in metrics}})
        train = item.config.get("train") if isinstance(item.config.get("train"), dict) else {}
        rank = train.get("lora_rank")
        row = {"run": item.name, "benchmark": r.benchmark, "method": r.method, "optimizer": r.optimizer,
               "lr": describe_lr(item.config.get("optimizer")) or None,
               "lora_rank": rank if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 else None,
               "steps": r.train.get("steps"), "seconds": r.train.get("seconds"),
               "collapsed": ("yes" if r.collapsed else "no") if any_collapsed else None,
               **{k: r.metrics.get(k) for k in metrics}}
        row.update({f"attack/{a.attack}": _attacked(a, r.headline) for a in item.attacks})
        row.update({f"recovery/{a.attack}": a.recovery.ratio for a in item.attacks if a.recovery is not None})
        rows.append(row)
    return Table(columns, list(before.values()) + rows)


def _attacked(attack: AttackRecord, headline: str) -> float | None:
    """The value an attack's recovery is measured on (relearning: the forget items it did not train on), else
    the run's headline metric after the attack."""
    rec = attack.recovery
    return rec.attacked if rec is not None and rec.attacked is not None else attack.metrics.get(headline)


def run_summary(name: str, record: RunRecord) -> Table:
    """The table `unlearn run` prints: the starting point, the model after each earlier request of a sequential
    run, and the run itself."""
    table = runs_table([Found(name, record, [])])
    stages = [{"run": f"after {s.get('stage')}", "benchmark": record.benchmark, "method": record.method,
               "optimizer": record.optimizer, **(s.get("metrics") or {})} for s in (record.stages or [])[:-1]]
    table.rows[-1:-1] = stages
    return table


def _settings_text(settings: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items() if v is not None) or "—"


def attacks_table(found: list[Found]) -> Table:
    columns = [("run", "run"), ("attack", "attack"), ("kind", "kind"), ("settings", "settings"),
               ("metric", "recovery measured on"), ("unlearned", "unlearned"), ("attacked", "attacked"),
               ("target", "target"), ("recovery", "recovery ratio"), ("interval", "95 % interval (items)"),
               ("seconds", "seconds")]
    rows = []
    for item in found:
        declared = _declared(item.record)
        for a in item.attacks:
            rec = a.recovery
            key = rec.metric if rec is not None and rec.metric else item.record.headline
            metric = declaration(a.curve_metrics, key) or declaration(declared, key)
            row = {"run": item.name, "attack": a.attack, "kind": a.kind, "settings": _settings_text(a.settings),
                   "metric": _heading(metric, key), "seconds": a.seconds,
                   "recovery": rec.ratio if rec is not None else None,
                   "interval": f"[{rec.low:.3f}, {rec.high:.3f}] n={rec.n}"
                   if rec is not None and rec.low is not None and rec.high is not None else None}
            if rec is not None and rec.unlearned is not None:
                row |= {"unlearned": rec.unlearned, "attacked": rec.attacked, "target": rec.target}
            else:  # no recovery inputs recorded (a bare model, or an older record): the attacked value alone
                row |= {"attacked": a.metrics.get(key, a.curve[-1].get(key) if a.curve else None),
                        "unlearned": item.record.metrics.get(key), "target": item.record.target.get(key)}
            if rec is not None and rec.ratio is None and rec.note:
                row["recovery"] = rec.note
            if item.record.collapsed:  # a ratio on a destroyed model measures the destruction, not robustness
                row["recovery"] = f"{_fmt(row['recovery'])} (run collapsed: meaningless)"
            rows.append(row)
    return Table(columns, rows)


def _fmt(value: Any, key: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if key == "seconds" and isinstance(value, int | float):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(table: Table) -> str:
    columns = table.shown(ALWAYS)
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(key), key) for key, _ in columns) + " |" for row in table.rows]
    return "\n".join(lines)


def to_csv(table: Table) -> str:
    columns = table.shown(ALWAYS)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([title for _, title in columns])
    writer.writerows([[row.get(key) if row.get(key) is not None else "" for key, _ in columns] for row in table.rows])
    return buffer.getvalue()


def concept_markdown(found: list[Found]) -> str:
    """Per-concept breakdown of each run's headline metric (`<headline>/<tag>` keys), when its data is tagged."""
    tags: list[str] = []
    rows = []
    for item in found:
        headline = item.record.headline
        per = {k[len(headline) + 1:]: v for k, v in item.record.metrics.items() if k.startswith(headline + "/")}
        if per:
            tags += [t for t in per if t not in tags]
            rows.append({"run": item.name, "headline": headline, **per})
    if not rows:
        return ""
    lines = ["| run | metric | " + " | ".join(tags) + " |", "|" + "---|" * (len(tags) + 2)]
    lines += [f"| {r['run']} | {r['headline']} | " + " | ".join(_fmt(r.get(t)) for t in tags) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ curves


def curves(found: list[Found]) -> dict[str, tuple[Metric | None, dict[str, list[tuple[int, float]]]]]:
    """measured metric -> (its declaration, {"run / attack": [(step, value)]}) for attacks with a curve."""
    out: dict[str, tuple[Metric | None, dict[str, list[tuple[int, float]]]]] = {}
    for item in found:
        for a in item.attacks:
            key = a.curve_metric
            if key is None or not a.curve:
                continue
            metric = a.curve_metrics[0] if a.curve_metrics else None
            entry = out.setdefault(key, (metric, {}))
            entry[1][f"{item.name} / {a.attack}"] = [(p["step"], p[key]) for p in a.curve]
    return out


def plot_curves(panels: dict[str, tuple[Metric | None, dict[str, list[tuple[int, float]]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, (metric, lines)) in zip(axes[0], sorted(panels.items()), strict=True):
        for name, points in sorted(lines.items()):
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=name)
        ax.set_xlabel("attack steps")
        ax.set_ylabel(_heading(metric, key) + (f" ({metric.unit})" if metric and metric.unit else ""))
        ax.set_title(f"Recovery of {metric.title if metric else key}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_report(runs_dir: Path, csv_path: Path | None = None,
                 notes: list[str] | None = None) -> tuple[str, list[Path]]:
    """Both tables as Markdown (returned, and saved with the plot as report.md) and as CSV; runs left out because
    another process is writing them are named in `notes`."""
    if csv_path is not None:
        check_csv_path(csv_path)
    found = find_runs(runs_dir, notes)
    runs, attacks = runs_table(found), attacks_table(found)
    text = markdown(runs)
    csv_file = csv_path or runs_dir / "report.csv"
    written = [runs_dir / "report.md", csv_file]
    page = ["# Unlearning report", "", text, ""]
    if attacks.rows:
        text += "\n\n" + markdown(attacks)
        written.append(csv_file.with_name(csv_file.stem + "-attacks.csv"))
        page += ["`after <attack>`: the value recovery is measured on, after that attack (relearning: the forget "
                 "items it did not train on; quantization: the run's headline metric).", "",
                 "## Attacks", "", "Recovery ratio = (attacked − unlearned) / (target − unlearned) on the metric "
                 "named: 0 = nothing came back, 1 = all of it.", "", markdown(attacks), ""]
    concepts = concept_markdown(found)
    if concepts:
        page += ["## Per concept", "", "The headline forget metric on each concept the questions are tagged with: "
                 "one average can hide a concept that was not forgotten at all.", "", concepts, ""]
    panels = curves(found)
    if panels:
        plot_curves(panels, runs_dir / "attack_curves.png")
        written.append(runs_dir / "attack_curves.png")
        page += ["![recovery curves](attack_curves.png)", ""]
    write_text_atomic(written[0], "\n".join(page))
    write_text_atomic(written[1], to_csv(runs))
    if attacks.rows:
        write_text_atomic(written[2], to_csv(attacks))
    return text, written
