"""What every benchmark hands the toolkit: training text and a way to score a model.

A benchmark module has a `load(config) -> Task` function (registered in `benchmarks/__init__.py`). The Task
carries the forget/retain training pairs every objective consumes, and `evaluate`, which returns a flat
dict of metrics (what metrics.json holds). `headline` names the metric whose drop *is* forgetting; the
attacks measure recovery on it and the report puts it first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from unlearn.data import Example


@dataclass
class Stage:
    """One unlearning request of a sequential run (MUSE's sustainability splits): its forget text."""

    name: str
    forget: list[Example]


@dataclass
class Task(ABC):
    name: str
    fingerprint: str  # changes whenever the data does: caches (target models, baselines) key on it
    forget: list[Example]
    retain: list[Example]
    # Metric keys whose drop is forgetting; the first one is the headline (recovery ratio, report).
    forget_metrics: tuple[str, ...]
    # True when the base model must first be fine-tuned to *know* the forget set (the embedded benchmark);
    # real benchmarks unlearn from the model as given.
    needs_target: bool = False
    # Sequential unlearning: requests applied one after another, evaluated after each. Empty = one request.
    stages: list[Stage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # metrics that could not be computed, and why
    # Why `forget` is empty when it is (the data has no unlearning text): the error `unlearn run` gives.
    training_hint: str = ""
    units: dict[str, str] = field(default_factory=dict)  # metric key -> unit, as printed beside the value

    def unit(self, key: str) -> str:
        """A metric's unit: its own entry, else that of the longest declared key it extends
        ("wmdp/acc/virology" has the unit of "wmdp/acc")."""
        best = max((k for k in self.units if key == k or key.startswith(k + "/") or key.startswith(k + "_")),
                   key=len, default=None)
        return self.units[best] if best is not None else ""

    @property
    def headline(self) -> str:
        return self.forget_metrics[0]

    @abstractmethod
    def evaluate(self, model: Any, tokenizer: Any, settings: Any, progress: bool = True) -> dict[str, float]:
        """All metrics of one model on this benchmark. `settings` is the run's EvalConfig."""
