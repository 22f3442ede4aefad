"""`unlearn eval`: score a run's model, or any model, on its benchmark.

A run's record is rewritten through `RunRecord`, never as a raw dict: its metrics, their declarations and its
collapse verdict are those of the new evaluation (judged against the run's own starting model), and items.json gets
the new per-item values of the unlearned model beside the target's. The caller holds the run
(unlearn.storage.locks.hold), so the record and the config it sits beside belong to one run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from unlearn.attacks.base import Subject
from unlearn.compute.models import load_model
from unlearn.core.files import write_json_atomic
from unlearn.evaluation.collapse import collapse_reasons
from unlearn.evaluation.measures import evaluate_items
from unlearn.storage.records import ITEMS_FILE, read_items, read_run


@dataclass
class Evaluation:
    metrics: dict[str, float]
    samples: list[dict[str, Any]]
    seconds: float  # model load included
    record: Path | None  # the run's metrics.json, rewritten; None for a bare model


def evaluate(subject: Subject, progress: bool = True) -> Evaluation:
    started = time.perf_counter()
    loaded = load_model(subject.model_spec, trust_remote_code=subject.trust_remote_code,
                        placement=subject.placement)
    metrics, items, samples = evaluate_items(lambda: subject.task.evaluate(
        loaded.model, loaded.tokenizer, subject.eval_settings, progress=progress))
    written = None if subject.run_dir is None else record_evaluation(subject, metrics, items)
    return Evaluation(metrics, samples, time.perf_counter() - started, written)


def record_evaluation(subject: Subject, metrics: dict[str, float], items: dict[str, list[float]]) -> Path:
    """The run's metrics.json and items.json after a new evaluation of its model."""
    assert subject.run_dir is not None
    path = subject.run_dir / "metrics.json"
    declared = list(subject.task.metrics)
    if path.is_file():
        record = read_run(path)
        record = replace(record, metrics=metrics, declared=declared,
                         collapse=collapse_reasons(metrics, record.target, declared,
                                                   subject.eval_settings.collapse_ratio))
        data = record.to_json()
    else:  # a model folder with a config but no record yet: the evaluation is all there is to say
        data = {"metrics": metrics, "declared": [m.to_dict() for m in declared]}
    write_json_atomic(path, data)
    kept = read_items(subject.run_dir / ITEMS_FILE)
    write_json_atomic(subject.run_dir / ITEMS_FILE, {**kept, "unlearned": items})
    return path
