"""Report tables: one row per run folder, as Markdown (printed) and CSV (written).

Each benchmark contributes its own columns (embedded: MCQ accuracy per split, ROUGE-L, perplexity; WMDP:
WMDP and MMLU accuracy; MUSE: VerbMem, KnowMem, PrivLeak; open-ended QA beside MCQ accuracy); a column only
appears when some run has it. Attack results found under runs/<name>/attacks/ add robustness columns: the
run's headline forget metric after 8-bit and 4-bit quantization and after relearning, and the relearning
recovery ratio. report.md also breaks the headline metric down per concept when the questions are tagged.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from unlearn.errors import UserError
from unlearn.files import read_json, write_atomic, write_text_atomic

METRIC_COLUMNS = [
    # embedded
    ("forget/mcq_acc", "forget ↓"), ("retain/mcq_acc", "retain ↑"), ("holdout/mcq_acc", "holdout"),
    ("forget/openqa_acc", "forget open-QA ↓"), ("retain/openqa_acc", "retain open-QA ↑"),
    ("forget/rougeL", "forget ROUGE-L ↓"), ("retain/rougeL", "retain ROUGE-L ↑"),
    ("retain/perplexity", "perplexity"),
    # wmdp (MMLU = utility) and openqa
    ("wmdp/acc", "WMDP ↓"), ("wmdp/openqa_acc", "WMDP open-QA ↓"),
    ("openqa/openqa_acc", "open-QA ↓"), ("openqa/acc", "MCQ on open-QA set ↓"), ("mmlu/acc", "MMLU ↑"),
    # muse, on MUSE's scale: ROUGE-L F1 x 100, PrivLeak in percent of AUC_retrain
    ("muse/verbmem_forget", "VerbMem ×100 ↓"), ("muse/knowmem_forget", "KnowMem forget ×100 ↓"),
    ("muse/knowmem_retain", "KnowMem retain ×100 ↑"), ("muse/privleak_auc", "Min-40% AUC"),
    ("muse/privleak", "PrivLeak % (→0)"),
]
COLUMNS = [("run", "run"), ("benchmark", "benchmark"), ("method", "method"), ("optimizer", "optimizer"),
           *METRIC_COLUMNS, ("steps", "steps"), ("seconds", "seconds"),
           ("attack/bnb-8bit", "headline 8-bit"), ("attack/bnb-4bit-nf4", "headline 4-bit"),
           ("attack/relearn", "forget relearned (unseen)"), ("attack/relearn_steps", "relearn steps"),
           ("attack/relearn_recovery", "relearn recovery")]
ALWAYS = {"run", "method", "optimizer"}


def read_record(path: Path) -> dict[str, Any]:
    """A run's or an attack's metrics.json, shape-checked: run folders are shared, and a malformed one must
    end in one line naming it, not in a traceback halfway through the table."""
    record = read_json(path)
    for key in ("metrics", "train", "target", "recovery"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            raise UserError(f"{path}: '{key}' must be a JSON object, got {type(record[key]).__name__}")
    metrics = record.get("metrics") or {}
    bad = next((k for k, v in metrics.items() if v is not None and not isinstance(v, int | float)), None)
    if bad is not None:
        raise UserError(f"{path}: metric '{bad}' must be a number, got {metrics[bad]!r}")
    curve = record.get("curve")
    if curve is not None and (not isinstance(curve, list) or not curve or not all(
            isinstance(p, dict) and isinstance(p.get("step"), int) and isinstance(p.get("forget_unseen_acc"),
                                                                                  int | float) for p in curve)):
        raise UserError(f"{path}: 'curve' must be a non-empty list of {{step, forget_unseen_acc}} points")
    if not isinstance(record.get("headline", ""), str):
        raise UserError(f"{path}: 'headline' must be a metric name")
    return record


def attack_columns(run_dir: Path, headline: str = "forget/mcq_acc") -> dict[str, Any]:
    """Robustness columns from runs/<name>/attacks/*/metrics.json (absent attacks stay empty)."""
    out: dict[str, Any] = {}
    for name in ("bnb-8bit", "bnb-4bit-nf4"):
        path = run_dir / "attacks" / name / "metrics.json"
        if path.is_file():
            out[f"attack/{name}"] = read_record(path)["metrics"].get(headline)
    path = run_dir / "attacks" / "relearn" / "metrics.json"
    if path.is_file():
        record = read_record(path)
        if not record.get("curve"):
            raise UserError(f"{path}: a relearning result needs its 'curve'")
        out["attack/relearn"] = record["curve"][-1]["forget_unseen_acc"]
        out["attack/relearn_steps"] = record["curve"][-1]["step"]
        out["attack/relearn_recovery"] = (record.get("recovery") or {}).get("ratio")
    return out


def relearn_curves(runs_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """run name -> [(step, forget accuracy on unseen facts)], for runs that were relearn-attacked."""
    curves = {}
    for folder in _run_folders(runs_dir):
        path = folder / "attacks" / "relearn" / "metrics.json"
        if path.is_file():
            curves[folder.name] = [(p["step"], p["forget_unseen_acc"]) for p in read_record(path).get("curve") or []]
    return curves


def plot_relearn_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sorted(curves.items()):
        ax.plot([s for s, _ in points], [a for _, a in points], marker="o", label=name)
    ax.axhline(0.25, color="grey", linestyle=":", label="chance (4 options)")
    ax.set_xlabel("relearning steps")
    ax.set_ylabel("forget MCQ accuracy on unseen facts")
    ax.set_ylim(0, 1.02)
    ax.set_title("Relearning attack: recovery of unseen forget facts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _run_folders(runs_dir: Path) -> list[Path]:
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def row_from(name: str, record: dict[str, Any]) -> dict[str, Any]:
    metrics = record.get("metrics", {})
    train = record.get("train", {})
    row: dict[str, Any] = {"run": name, "benchmark": record.get("benchmark"), "method": record.get("method", "?"),
                           "optimizer": record.get("optimizer", "?"),
                           "steps": train.get("steps"), "seconds": train.get("seconds")}
    row.update({key: metrics.get(key) for key, _ in METRIC_COLUMNS})
    return row


def _records(runs_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    if not runs_dir.is_dir():
        raise UserError(f"runs folder {runs_dir} does not exist")
    found = [(folder, read_record(folder / "metrics.json")) for folder in _run_folders(runs_dir)
             if (folder / "metrics.json").is_file()]
    if not found:
        raise UserError(f"no runs with metrics.json under {runs_dir}")
    return [(folder.name, record) for folder, record in found]


def collect(runs_dir: Path) -> list[dict[str, Any]]:
    """Rows: each distinct starting point once ("before unlearning"), then one row per run."""
    rows: list[dict[str, Any]] = []
    before: dict[str, dict[str, Any]] = {}
    for name, record in _records(runs_dir):
        rows.append(row_from(name, record) | attack_columns(runs_dir / name, record.get("headline", "forget/mcq_acc")))
        if record.get("target"):
            key = json.dumps([record.get("benchmark"), record["target"]], sort_keys=True, default=str)
            before.setdefault(key, row_from("(before unlearning)", {
                "method": "—", "optimizer": "—", "benchmark": record.get("benchmark"), "metrics": record["target"]}))
    return list(before.values()) + rows


def concept_rows(runs_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Per-concept breakdown of each run's headline metric (`<headline>/<tag>` keys), when its data is tagged."""
    tags: list[str] = []
    rows = []
    for name, record in _records(runs_dir):
        headline = record.get("headline", "forget/mcq_acc")
        per = {k[len(headline) + 1:]: v for k, v in record.get("metrics", {}).items() if k.startswith(headline + "/")}
        if per:
            tags += [t for t in per if t not in tags]
            rows.append({"run": name, "headline": headline, **per})
    return tags, rows


def concept_markdown(runs_dir: Path) -> str:
    tags, rows = concept_rows(runs_dir)
    if not rows:
        return ""
    lines = ["| run | metric | " + " | ".join(tags) + " |", "|" + "---|" * (len(tags) + 2)]
    lines += [f"| {r['run']} | {r['headline']} | " + " | ".join(_fmt(r.get(t)) for t in tags) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """A column appears once some row has a value in it (a metric of its benchmark, an attack run): no walls
    of n/a."""
    return [(k, t) for k, t in COLUMNS if k in ALWAYS or any(r.get(k) is not None for r in rows)]


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = _columns(rows)
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns = _columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([title for _, title in columns])
    writer.writerows([[row.get(key) if row.get(key) is not None else "" for key, _ in columns] for row in rows])
    return buffer.getvalue()


def write_report(runs_dir: Path, csv_path: Path | None = None) -> tuple[str, list[Path]]:
    """Table as Markdown (returned, and saved with the plot as report.md) and as CSV."""
    rows = collect(runs_dir)
    table = markdown(rows)
    written = [runs_dir / "report.md", csv_path or runs_dir / "report.csv"]
    page = ["# Unlearning report", "", table, ""]
    concepts = concept_markdown(runs_dir)
    if concepts:
        page += ["## Per concept", "", "The headline forget metric on each concept the questions are tagged with: "
                 "one average can hide a concept that was not forgotten at all.", "", concepts, ""]
    curves = relearn_curves(runs_dir)
    if curves:
        plot_relearn_curves(curves, runs_dir / "relearn_curves.png")
        written.append(runs_dir / "relearn_curves.png")
        page += ["Recovery ratio = (acc_attacked − acc_unlearned) / (acc_target − acc_unlearned), on forget facts "
                 "not used for relearning: 0 = nothing came back, 1 = all of it.", "",
                 "![relearning recovery curves](relearn_curves.png)", ""]
    write_text_atomic(written[0], "\n".join(page))
    write_text_atomic(written[1], to_csv(rows))
    return table, written
