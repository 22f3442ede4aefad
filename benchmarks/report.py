"""Report tables: one row per run folder, as Markdown (printed) and CSV (written)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from unlearn.errors import UserError
from unlearn.runs import read_json

COLUMNS = [("run", "run"), ("method", "method"), ("optimizer", "optimizer"),
           ("forget/mcq_acc", "forget ↓"), ("retain/mcq_acc", "retain ↑"), ("holdout/mcq_acc", "holdout"),
           ("forget/rougeL", "forget ROUGE-L ↓"), ("retain/rougeL", "retain ROUGE-L ↑"),
           ("retain/perplexity", "perplexity"), ("steps", "steps"), ("seconds", "seconds")]


def row_from(name: str, record: dict[str, Any]) -> dict[str, Any]:
    metrics = record.get("metrics", {})
    train = record.get("train", {})
    row: dict[str, Any] = {"run": name, "method": record.get("method", "?"),
                           "optimizer": record.get("optimizer", "?"),
                           "steps": train.get("steps"), "seconds": train.get("seconds")}
    row.update({key: metrics.get(key) for key, _ in COLUMNS if "/" in key})
    return row


def collect(runs_dir: Path) -> list[dict[str, Any]]:
    if not runs_dir.is_dir():
        raise UserError(f"runs folder {runs_dir} does not exist")
    rows: list[dict[str, Any]] = []
    target: dict[str, Any] | None = None
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / "metrics.json").is_file():
            continue
        record = read_json(folder / "metrics.json")
        rows.append(row_from(folder.name, record))
        if target is None and record.get("target"):
            target = row_from("(target, before unlearning)", {"method": "—", "optimizer": "—",
                                                              "metrics": record["target"]})
    if not rows:
        raise UserError(f"no runs with metrics.json under {runs_dir}")
    return ([target] if target else []) + rows


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(key)) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([title for _, title in COLUMNS])
    writer.writerows([[row.get(key) if row.get(key) is not None else "" for key, _ in COLUMNS] for row in rows])
    return buffer.getvalue()
