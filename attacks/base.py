"""What an attack is: a registered component with a settings dataclass, run against one model.

An attack class declares `Settings` (a dataclass: its fields, types and ranges are the settings; defaults in
configs/attack/<name>.yaml) and implements `run`, which returns the attacked model's metrics on the subject's
benchmark and, when it measures more than once (relearning), a curve. The recipe (unlearn/recipes/attack.py)
loads the settings, writes the record and computes the recovery ratio, the same way for every attack.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from unlearn.compute.placement import CPU_FP32, Placement
from unlearn.core.registry import Registry
from unlearn.core.settings import declares_settings
from unlearn.storage.metrics import Metric
from unlearn.storage.records import Recovery
from unlearn.tasks.task import ItemSubset, Task
from unlearn.training.config import EvalConfig


@dataclass
class Subject:
    """What is attacked: a model, the benchmark it is scored on, and (for runs) where results go."""

    model_spec: str
    task: Task
    eval_settings: EvalConfig
    target_model: str | None = None  # the model unlearning started from (recovery is measured against it)
    trust_remote_code: bool = False  # from the command-line flag only, never from the run's config
    run_dir: Any = None  # Path of the run folder, or None for a bare model (results printed only)
    unlearned: dict[str, float] | None = None  # metrics of the unlearned model, from the run
    target: dict[str, float] | None = None  # metrics of the target model before unlearning, from the run
    placement: Placement = CPU_FP32  # where and in what precision its models load (--device, --dtype)
    seed: int = 0  # the run's train.seed: an attack's own seed (relearning split, data order) when none is given
    collapse: list[str] = field(default_factory=list)  # why the run counts as collapsed (empty: it does not)
    # Per-item values of the run's metrics (its items.json): {"unlearned": {key: [...]}, "target": {...}}
    items: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@dataclass
class AttackResult:
    metrics: dict[str, float]  # the attacked model on the benchmark, as `unlearn eval` would report it
    details: dict[str, Any] = field(default_factory=dict)  # recorded as they are (what was used, timings)
    # Repeated measurements (relearning checkpoints): {"step": n, <probe metric>: value, ...} per point; recovery
    # is then measured on `curve_metric` between the first and the last point, against `target_probe`.
    curve: list[dict[str, float]] | None = None
    curve_metrics: tuple[Metric, ...] = ()
    target_probe: dict[str, float] | None = None
    measured_on: str | None = None
    curve_items: ItemSubset | None = None  # the curve's metrics as full-evaluation metrics on some items, if they are
    # Recoveries the attack measures itself (membership inference: the share of the target's signal left), instead
    # of the recipe's (attacked - unlearned) / (target - unlearned) on the benchmark's metrics.
    recoveries: list[Recovery] | None = None


class Attack(ABC):
    Settings: ClassVar[type]
    summary: ClassVar[str] = ""  # one line for `unlearn attacks`
    # Settings `folder()` already spells out, and settings that change what is measured along the way but not the
    # attacked model: neither adds to the result's folder name (see unlearn/recipes/attack.py, result_folder).
    named_by: ClassVar[tuple[str, ...]] = ()
    measurement_only: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def folder(self, settings: Any) -> str:
        """The result's folder name under runs/<name>/attacks/ (one per distinct attack setting)."""

    def check(self, subject: Subject, settings: Any) -> None:
        """Checks that need the benchmark but no model, run before anything is loaded (default: none)."""
        return None

    @abstractmethod
    def run(self, subject: Subject, settings: Any, progress: bool = True) -> AttackResult:
        """Attack `subject.model_spec` and score the result on `subject.task`."""


ATTACKS: Registry[type[Attack]] = Registry("attack", check=declares_settings("attack"), members="unlearn.attacks")
