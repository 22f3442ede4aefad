"""What every benchmark hands the toolkit: training text, declared metrics, and a way to score a model.

A benchmark module registers a `load(config) -> Task` function in `BENCHMARKS`. The Task carries the
forget/retain training pairs every method consumes, `metrics` (what each metric means, which way is better,
its role), and `evaluate`, which returns a flat dict of metric values (what metrics.json holds). The report,
the recovery ratio and the attacks read the declarations, so none of them names a benchmark.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from unlearn.core.errors import UserError
from unlearn.core.registry import Registry
from unlearn.core.settings import declares_settings, from_mapping
from unlearn.storage.metrics import Metric, declaration
from unlearn.tasks.data import Example


@dataclass
class Stage:
    """One unlearning request of a sequential run (MUSE's sustainability splits): its forget text."""

    name: str
    forget: list[Example]


Probe = Callable[[Any, Any, Any], dict[str, float]]  # (model, tokenizer, EvalConfig) -> metric values


@dataclass(frozen=True)
class ItemSubset:
    """Probe metrics that are full-evaluation metrics restricted to some of its items: {probe key: evaluation key}
    and the item indices. The per-item values recorded for the evaluation keys then give the probe's intervals."""

    keys: dict[str, str]
    indices: list[int]


@dataclass
class RelearnPlan:
    """What a relearning attack needs from a benchmark: text to fine-tune on and a measurement to repeat.

    `probe` is measured before, during and after the fine-tuning (and on the target model, for the recovery
    ratio); its first declared metric is the one recovery is measured on. `measured_on` says in words what it
    covers, and why the text fine-tuned on does not give the answers away."""

    train: list[Example]
    probe: Probe
    probe_metrics: tuple[Metric, ...]
    measured_on: str
    details: dict[str, Any] = field(default_factory=dict)  # recorded with the result (e.g. which items were used)
    items: ItemSubset | None = None  # how the probe's metrics map onto per-item evaluation values, when they do


@dataclass
class Membership:
    """What a membership-inference attack compares: items the model was trained on and should now treat as unseen
    (the forget set), and items it never saw (the holdout set)."""

    members: list[Example]
    nonmembers: list[Example]
    measured_on: str  # in words: which sets


def split_items(n: int, samples: int | None, seed: int, what: str = "forget items",
                hold_out: bool = True) -> tuple[list[int], list[int]]:
    """(indices of a seeded sample of `samples` of n items, default half; the other indices). With `hold_out`
    at least one item must stay out (recovery is measured on it); without, all n may be used."""
    most = n - 1 if hold_out else n
    samples = max(1, n // 2) if samples is None else samples
    if not 1 <= samples <= most:
        why = f"there are {n} {what}" + (", and some must stay out of the fine-tuning" if hold_out else "")
        raise UserError(f"relearning samples must be between 1 and {most} ({why})")
    used = sorted(random.Random(seed).sample(range(n), samples))
    chosen = set(used)
    return used, [i for i in range(n) if i not in chosen]


@dataclass
class Task(ABC):
    name: str
    fingerprint: str  # changes whenever the data does: caches (target models, baselines) key on it
    forget: list[Example]
    retain: list[Example]
    # Every metric evaluate() returns, declared; the first forget-role metric is the headline (recovery, report).
    metrics: tuple[Metric, ...]
    # True when the base model must first be fine-tuned to *know* the forget set (the embedded benchmark);
    # real benchmarks unlearn from the model as given.
    needs_target: bool = False
    # Sequential unlearning: requests applied one after another, evaluated after each. Empty = one request.
    stages: list[Stage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # metrics that could not be computed, and why
    # Why `forget` is empty when it is (the data has no unlearning text): the error `unlearn run` gives.
    training_hint: str = ""
    # Tokens per training text unless train.max_length says otherwise: what the benchmark's authors trained at.
    train_max_length: int = 256
    # The metrics that show a prepared target knows the data (`unlearn prepare` prints them; needs_target only).
    prepared_metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.forget_metrics:
            raise ValueError(f"benchmark {self.name!r} declares no forget metric")

    @property
    def forget_metrics(self) -> tuple[str, ...]:
        return tuple(m.key for m in self.metrics if m.role == "forget")

    @property
    def headline(self) -> str:
        return self.forget_metrics[0]

    def declared(self, key: str) -> Metric | None:
        return declaration(self.metrics, key)

    def unit(self, key: str) -> str:
        spec = self.declared(key)
        return spec.unit if spec is not None else ""

    @abstractmethod
    def evaluate(self, model: Any, tokenizer: Any, settings: Any, progress: bool = True) -> dict[str, float]:
        """All metrics of one model on this benchmark. `settings` is the run's EvalConfig."""

    def probe(self, model: Any, tokenizer: Any, settings: Any) -> dict[str, float]:
        """The forget and utility metrics alone, measured quickly enough to repeat during an attack. Default:
        the full evaluation, filtered; benchmarks with a cheaper path override it."""
        metrics = self.evaluate(model, tokenizer, settings, progress=False)
        return {m.key: metrics[m.key] for m in self.metrics if m.role != "info" and m.key in metrics}

    def relearn_plan(self, domain: str, samples: int | None, seed: int) -> RelearnPlan:
        """Fine-tune on a seeded sample of the forget text (domain "forget"; default half of it) or of the
        retain text (domain "retain": out-of-domain), and measure `probe`. Benchmarks whose evaluation items
        are the training items themselves override this to hold some out (the embedded benchmark)."""
        pool = self.forget if domain == "forget" else self.retain
        if not pool:
            raise UserError(f"benchmark '{self.name}' gives no {domain} text to relearn on"
                            + (f": {self.training_hint}" if self.training_hint else ""))
        # Recovery is measured on the benchmark's own items, not on the passages, so all of them may be used.
        used, _ = split_items(len(pool), samples, seed, f"{domain} passages", hold_out=False)
        probed = tuple(m for m in self.metrics if m.role != "info")
        return RelearnPlan(train=[pool[i] for i in used], probe=self.probe, probe_metrics=probed,
                           measured_on=f"{probed[0].key}: the benchmark's own forget items (the attack fine-tunes on "
                                       f"{len(used)} of {len(pool)} {domain} passages)",
                           details={"used_indices": used})


    def membership(self) -> Membership | None:
        """Forget items against holdout items, for benchmarks that have a holdout set (default: none)."""
        return None


class Benchmark(ABC):
    """A registered benchmark: its settings, the `benchmark` config section, declared as the dataclass `Settings`
    (keys, types, defaults and ranges), and `load(settings)`, which reads the data into a `Task`."""

    Settings: ClassVar[type]

    @classmethod
    def settings(cls, section: dict[str, Any], name: str) -> Any:
        """The section checked into `Settings` by the one settings check. A benchmark whose hand-written configs
        say null for "the default" drops those first (MUSE)."""
        return from_mapping(cls.Settings, section, "benchmark", owner=f"benchmark '{name}'", ignore=("name",))

    @abstractmethod
    def load(self, settings: Any) -> Task:
        """The benchmark's data as a Task (a file that cannot be read fails here, before any model loads)."""


BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark", check=declares_settings("benchmark"),
                                                 members="unlearn.benchmarks")


def load_task(benchmark: dict[str, Any]) -> Task:
    """The benchmark a config's `benchmark` section names (default: embedded), loaded from that section."""
    name = benchmark.get("name", "embedded")
    cls = BENCHMARKS.lookup(name)
    return cls().load(cls.settings(benchmark, name))
