"""The two records the toolkit writes and reads back: a run's and an attack's metrics.json.

Run folders are shared between people, so reading one back checks its shape: a malformed record ends in one
line naming the file, never in a traceback halfway through a report. Each record carries the declarations of
the metrics it holds (key, title, which way is better, role), so what reads it (the report, a study) needs to
know no benchmark and no attack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unlearn.core.errors import UserError, shown
from unlearn.core.files import read_json
from unlearn.storage.metrics import Metric

LEGACY_CURVE_METRIC = "forget_unseen_acc"  # relearning records written before curves named their metric
# Per-item metric values beside a run's (and an attack's) metrics.json: {"unlearned"|"target"|"attacked": {key: [..]}}
ITEMS_FILE = "items.json"


@dataclass
class Recovery:
    """How much of what unlearning removed an attack brought back, on one metric:
    (attacked - unlearned) / (target - unlearned); 0 = nothing came back, 1 = all of it, None = undefined."""

    metric: str
    measured_on: str
    ratio: float | None
    note: str
    unlearned: float | None = None
    attacked: float | None = None
    target: float | None = None
    curve: list[dict[str, Any]] | None = None  # {"step", "ratio"} per checkpoint, for attacks with a curve
    # 95 % bootstrap interval over the n items the metric averages (resampled jointly for the three models), when
    # their per-item values were recorded; None otherwise.
    low: float | None = None
    high: float | None = None
    n: int | None = None


def recovery_ratio(attacked: float, unlearned: float, target: float, better: str = "lower") -> tuple[float | None, str]:
    """The ratio, or None with the reason. `better` is the metric's declared direction for a forgetting model:
    unlearning must have moved it that way (down for an accuracy on forget items) for anything to recover."""
    gap = target - unlearned
    moved = {"higher": gap < -1e-9, "zero": abs(unlearned) < abs(target) - 1e-9}.get(better, gap > 1e-9)
    if not moved:
        return None, "undefined: unlearning did not move this metric below the target's"
    return (attacked - unlearned) / gap, "ok"


@dataclass
class RunRecord:
    method: str
    optimizer: str
    benchmark: str
    headline: str
    metrics: dict[str, float]
    declared: list[Metric]
    train: dict[str, Any] = field(default_factory=dict)
    target: dict[str, float] = field(default_factory=dict)  # the starting model's metrics
    notes: list[str] = field(default_factory=list)
    stages: list[dict[str, Any]] | None = None  # sequential runs: metrics after each request
    collapse: list[str] = field(default_factory=list)  # why the run counts as collapsed (unlearn.evaluation.collapse)
    # The base model's metrics before target preparation (benchmarks that prepare a target): with `target` and
    # `metrics`, a disagreement between two machines is localized to conversion, preparation or unlearning.
    base: dict[str, float] | None = None

    @property
    def collapsed(self) -> bool:
        return bool(self.collapse)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self) | {"declared": [m.to_dict() for m in self.declared],
                               "forget_metrics": [m.key for m in self.declared if m.role == "forget"],
                               "collapsed": self.collapsed}
        if self.stages is None:
            del data["stages"]
        if self.base is None:
            del data["base"]
        return data


@dataclass
class AttackRecord:
    attack: str  # the folder name under attacks/ (one per distinct setting: bnb-4bit-nf4, relearn-lora, ...)
    kind: str  # the registered attack
    settings: dict[str, Any]
    metrics: dict[str, float]
    seconds: float | None = None
    recovery: Recovery | None = None
    curve: list[dict[str, float]] | None = None
    curve_metrics: list[Metric] = field(default_factory=list)  # declarations of the curve's values, first = recovery
    details: dict[str, Any] = field(default_factory=dict)
    # Recovery on every forget metric measured (accuracy, Prob, ...); `recovery` is the first, on the headline.
    recoveries: list[Recovery] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self) | {"curve_metrics": [m.to_dict() for m in self.curve_metrics]}
        if not self.recoveries:
            del data["recoveries"]
        return {k: v for k, v in data.items() if v is not None}

    @property
    def every_recovery(self) -> list[Recovery]:
        """Recovery on every forget metric measured; a record written before `recoveries` has its one `recovery`."""
        return self.recoveries or ([self.recovery] if self.recovery is not None else [])

    @property
    def curve_metric(self) -> str | None:
        if not self.curve:
            return None
        return self.curve_metrics[0].key if self.curve_metrics else LEGACY_CURVE_METRIC


# ------------------------------------------------------------------------------------------------ reading


def is_number(value: Any) -> bool:
    """An int or float, not a bool (a YAML/JSON true is an int to isinstance)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _object(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _mapping(path: Path, record: dict[str, Any], key: str) -> dict[str, Any]:
    value = record.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: '{key}' must be a JSON object, got {type(value).__name__}")
    return value


def _numbers(path: Path, record: dict[str, Any], key: str) -> dict[str, float]:
    values = _mapping(path, record, key)
    bad = next((k for k, v in values.items() if v is not None and not is_number(v)), None)
    if bad is not None:
        raise UserError(f"{path}: metric '{bad}' must be a number, got {shown(values[bad])}")
    return values


def _text(path: Path, record: dict[str, Any], key: str, default: str) -> str:
    value = record.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise UserError(f"{path}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _declarations(path: Path, value: Any, key: str) -> list[Metric]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{path}: '{key}' must be a list of metric declarations")
    out = []
    for item in value:
        try:
            chance = item.get("chance")
            if chance is not None and (isinstance(chance, bool) or not isinstance(chance, int | float)):
                raise ValueError
            out.append(Metric(**{k: item[k] for k in ("key", "title", "better", "role")}, unit=item.get("unit", ""),
                              chance=chance))
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{path}: '{key}' holds a malformed metric declaration: {shown(item)}") from None
        if not all(isinstance(getattr(out[-1], f), str) for f in ("key", "title", "unit")):
            raise UserError(f"{path}: '{key}' holds a malformed metric declaration: {shown(item)}")
    return out


def read_run(path: Path) -> RunRecord:
    data = _object(path)
    metrics = _numbers(path, data, "metrics")
    stages = data.get("stages")
    if stages is not None and not (isinstance(stages, list) and all(isinstance(s, dict) for s in stages)):
        raise UserError(f"{path}: 'stages' must be a list of objects")
    notes = data.get("notes") or []
    return RunRecord(method=_text(path, data, "method", "?"), optimizer=_text(path, data, "optimizer", "?"),
                     benchmark=_text(path, data, "benchmark", "?"),
                     headline=_text(path, data, "headline", next(iter(metrics), "")), metrics=metrics,
                     declared=_declarations(path, data.get("declared"), "declared"),
                     train=_mapping(path, data, "train"), target=_numbers(path, data, "target"),
                     notes=[str(n) for n in notes] if isinstance(notes, list) else [str(notes)], stages=stages,
                     collapse=collapse_of(path, data), base=_numbers(path, data, "base") if "base" in data else None)


def collapse_of(path: Path, data: dict[str, Any]) -> list[str]:
    """The collapse reasons; a record from before collapse detection has none (and says nothing either way)."""
    reasons = data.get("collapse") or []
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise UserError(f"{path}: 'collapse' must be a list of strings")
    if data.get("collapsed") is True and not reasons:
        return ["flagged collapsed"]
    return reasons


def _number(path: Path, data: dict[str, Any], key: str, legacy: str | None = None) -> float | None:
    value = data.get(key, data.get(legacy) if legacy else None)
    if value is not None and not is_number(value):
        raise UserError(f"{path}: recovery '{key}' must be a number or null, got {shown(value)}")
    return value


def _curve(path: Path, value: Any, metric: str) -> list[dict[str, float]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(
            isinstance(p, dict) and isinstance(p.get("step"), int) and isinstance(p.get(metric), int | float)
            for p in value):
        raise UserError(f"{path}: 'curve' must be a non-empty list of {{step, {metric}}} points")
    return value


def _recovery(path: Path, recovery: dict[str, Any]) -> Recovery:
    n = recovery.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise UserError(f"{path}: recovery 'n' must be a count of items, got {shown(n)}")
    return Recovery(metric=str(recovery.get("metric") or recovery.get("measured_on") or ""),
                    measured_on=str(recovery.get("measured_on", "")), ratio=_number(path, recovery, "ratio"),
                    note=str(recovery.get("note", "")),
                    # older relearning records named the values *_acc
                    **{k: _number(path, recovery, k, f"{k}_acc") for k in ("unlearned", "attacked", "target")},
                    low=_number(path, recovery, "low"), high=_number(path, recovery, "high"), n=n)


def read_attack(path: Path, folder: str) -> AttackRecord:
    data = _object(path)
    declared = _declarations(path, data.get("curve_metrics"), "curve_metrics")
    metric = declared[0].key if declared else LEGACY_CURVE_METRIC
    recovery = _mapping(path, data, "recovery")
    every = data.get("recoveries") or []
    if not isinstance(every, list) or not all(isinstance(r, dict) for r in every):
        raise UserError(f"{path}: 'recoveries' must be a list of objects")
    seconds = data.get("seconds")
    return AttackRecord(
        attack=folder, kind=_text(path, data, "kind", "?"),
        settings=_mapping(path, data, "settings") or _mapping(path, data, "spec"),  # "spec": older quantize records
        metrics=_numbers(path, data, "metrics"), seconds=seconds if isinstance(seconds, int | float) else None,
        recovery=_recovery(path, recovery) if recovery else None,
        curve=_curve(path, data.get("curve"), metric), curve_metrics=declared,
        details=_mapping(path, data, "details"), recoveries=[_recovery(path, r) for r in every])


def _vectors(path: Path, where: str, values: Any) -> dict[str, list[float]]:
    if not isinstance(values, dict) or not all(
            isinstance(v, list) and all(is_number(x) for x in v) for v in values.values()):
        raise UserError(f"{path}: '{where}' must map names to lists of numbers")
    return values


def read_items(path: Path) -> dict[str, Any]:
    """A run's or an attack's items.json ({} when there is none: older folders, or nothing per item to record),
    its shape checked: {model: {metric key: [number per item]}}, and for an attack also "recovery": {metric key:
    {"target"|"unlearned"|"attacked": [number per item]}} (the values its recovery intervals resampled)."""
    if not path.is_file():
        return {}
    data = _object(path)
    for model, values in data.items():
        if model == "recovery":
            if not isinstance(values, dict):
                raise UserError(f"{path}: 'recovery' must be an object")
            for key, vectors in values.items():
                _vectors(path, f"recovery.{key}", vectors)
        else:
            _vectors(path, model, values)
    return data


def describe_lr(optimizer: Any) -> str:
    """The learning rate(s) of an optimizer section: `1e-05`, or `fo 1e-05 / zo 0.001` for a hybrid."""
    if not isinstance(optimizer, dict):
        return ""
    if is_number(optimizer.get("lr")):
        return f"{optimizer['lr']:g}"
    parts = [f"{k} {optimizer[k]['lr']:g}" for k in ("fo", "zo")
             if isinstance(optimizer.get(k), dict) and is_number(optimizer[k].get("lr"))]
    return " / ".join(parts)
