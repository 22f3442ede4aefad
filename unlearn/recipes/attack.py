"""Run a registered attack against a run folder (or any model) and record it like `unlearn eval` does.

Results go to runs/<name>/attacks/<folder>/metrics.json (one folder per distinct attack setting), staged and
renamed into place, with the same metrics as `unlearn eval` plus a recovery ratio on one declared forget
metric:
    (attacked - unlearned) / (target - unlearned)
0 = nothing came back, 1 = everything did. It is undefined (reported as null, with the reason) when unlearning
did not move the metric the way forgetting does, since then there is nothing to recover.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from unlearn.attacks.base import ATTACKS, Attack, AttackResult, Subject
from unlearn.compute.placement import Placement
from unlearn.compute.placement import resolve as resolve_placement
from unlearn.core.errors import UserError, shown
from unlearn.core.files import read_json, write_json_atomic
from unlearn.core.settings import from_mapping
from unlearn.evaluation.collapse import COLLAPSED_NOTE
from unlearn.evaluation.measures import collect_samples, item_values
from unlearn.evaluation.stats import UNRELIABLE_NOTE, recovery_interval, removal_beyond_noise
from unlearn.optim.protocol import OPTIMIZERS
from unlearn.storage.records import ITEMS_FILE, AttackRecord, Recovery, collapse_of, read_items, recovery_ratio
from unlearn.storage.runs import staged_dir
from unlearn.tasks.task import Task, load_task
from unlearn.training.config import apply_override, component_defaults, eval_config, merge, read_yaml


def attack_settings(name: str, flags: dict[str, Any] | None = None,
                    overrides: list[str] | None = None) -> tuple[str, Attack, Any]:
    """(registered name, attack, settings): configs/attack/<name>.yaml < flags < `--set attack.key=value`,
    every key known, typed and in range, before any model is loaded."""
    canonical = ATTACKS.canonical(name)
    cls = ATTACKS[canonical]
    settings = component_defaults("attack", canonical)
    known = {f.name for f in fields(cls.Settings)}
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in known:
            raise UserError(f"--{key.replace('_', '-')} is not a setting of attack '{canonical}' "
                            f"(its settings: {', '.join(sorted(known))})")
        settings[key] = value
    layer: dict[str, Any] = {}
    for assignment in overrides or []:
        apply_override(layer, assignment)
    settings = merge(settings, layer.get("attack") or {})
    return canonical, cls(), from_mapping(cls.Settings, settings, "attack")


Vectors = dict[str, list[float]]  # per item, for "target", "unlearned", "attacked"


def _interval(recovery: Recovery, subject: Subject, attacked: dict[str, list[float]], key: str, better: str,
              indices: list[int] | None = None) -> tuple[Recovery, Vectors | None]:
    """`recovery` with its interval over items, and the per-item values it came from, when the unlearned, target and
    attacked model's values of evaluation metric `key` were all recorded (on `indices` of its items, when given)."""
    vectors = [subject.items.get("target", {}).get(key), subject.items.get("unlearned", {}).get(key),
               attacked.get(key)]
    if any(v is None for v in vectors) or len({len(v) for v in vectors}) != 1:  # type: ignore[arg-type]
        return recovery, None
    if indices is not None:
        if not indices or max(indices) >= len(vectors[0]):  # type: ignore[arg-type]
            return recovery, None
        vectors = [[v[i] for i in indices] for v in vectors]  # type: ignore[index]
    interval = recovery_interval(*vectors, better=better, seed=subject.seed)  # type: ignore[arg-type]
    used = dict(zip(("target", "unlearned", "attacked"), vectors, strict=True))  # type: ignore[arg-type]
    if recovery.ratio is not None and not removal_beyond_noise(vectors[0], vectors[1], seed=subject.seed):
        # The denominator is itself noise: a ratio of noise can take any value (-44 was seen).
        recovery = replace(recovery, note="; ".join(filter(None, [recovery.note, UNRELIABLE_NOTE])))
    if not math.isfinite(interval.low):
        return replace(recovery, n=interval.n), used
    return replace(recovery, low=round(interval.low, 4), high=round(interval.high, 4), n=interval.n), used


def _recoveries(subject: Subject, result: AttackResult,
                attacked_items: dict[str, list[float]]) -> tuple[list[Recovery], dict[str, Vectors]]:
    """Recovery on every forget metric measured, the headline's first; and the per-item values of each, by metric."""
    vectors: dict[str, Vectors] = {}
    if result.recoveries is not None:
        return result.recoveries, vectors
    if result.curve:
        # Attacks that measure repeatedly: recovery on their own probe, from its first to its last point.
        if result.target_probe is None:
            return [], vectors  # no target to compare with (a bare model)
        out = []
        for metric in result.curve_metrics:
            if metric.role != "forget" or metric.key not in result.curve[0] or metric.key not in result.target_probe:
                continue
            unlearned, attacked = result.curve[0][metric.key], result.curve[-1][metric.key]
            target = result.target_probe[metric.key]
            ratio, why = recovery_ratio(attacked, unlearned, target, metric.better)
            per_step = [{"step": p["step"], "ratio": recovery_ratio(p[metric.key], unlearned, target,
                                                                    metric.better)[0]} for p in result.curve]
            recovery = Recovery(metric=metric.key, measured_on=result.measured_on or metric.key, ratio=ratio, note=why,
                                unlearned=unlearned, attacked=attacked, target=target, curve=per_step)
            subset = result.curve_items
            if subset is not None and metric.key in subset.keys:
                recovery, used = _interval(recovery, subject, attacked_items, subset.keys[metric.key], metric.better,
                                           subset.indices)
                if used is not None:
                    vectors[metric.key] = used
            out.append(recovery)
        return out, vectors
    if not (subject.unlearned and subject.target):
        return [], vectors
    out = []
    for key in subject.task.forget_metrics:
        if key not in subject.unlearned or key not in subject.target or key not in result.metrics:
            continue
        spec = subject.task.declared(key)
        better = spec.better if spec else "lower"
        unlearned, attacked, target = subject.unlearned[key], result.metrics[key], subject.target[key]
        ratio, why = recovery_ratio(attacked, unlearned, target, better)
        recovery, used = _interval(Recovery(metric=key, measured_on=key, ratio=ratio, note=why, unlearned=unlearned,
                                            attacked=attacked, target=target), subject, attacked_items, key, better)
        if used is not None:
            vectors[key] = used
        out.append(recovery)
    return out, vectors


def result_folder(name: str, attack: Attack, settings: Any, run_seed: int) -> str:
    """The attack's folder name, plus every setting that differs from its configs/attack default (a seed: from the
    attacked run's own), so results of different settings and seeds sit side by side instead of replacing each other:
    relearn, relearn-lr0.0001-steps100, relearn-seed3."""
    defaults = from_mapping(type(settings), component_defaults("attack", name), "attack")
    parts = []
    for f in fields(settings):
        if f.name in attack.named_by or f.name in attack.measurement_only:
            continue
        value, default = getattr(settings, f.name), getattr(defaults, f.name)
        if f.name == "seed":
            default = run_seed
        if value != default:
            text = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f.name.replace("_", "") + text)
    return "-".join([attack.folder(settings), *parts])


def run_attack(subject: Subject, name: str, attack: Attack, settings: Any,
               progress: bool = True) -> tuple[AttackRecord, Path | None]:
    """Run one attack and write its record into the run folder (when there is one). An attack seed left unset is the
    run's own (`--seed` of `unlearn run` then sets the attack's split and order too); the record holds the one used."""
    settings = with_run_seed(settings, subject.seed)
    attack.check(subject, settings)
    started = time.perf_counter()
    with collect_samples() as samples:  # the attacked model's per-item values, for the intervals
        result = attack.run(subject, settings, progress=progress)
    items = item_values(samples, result.metrics)
    recoveries, vectors = _recoveries(subject, result, items)
    if subject.collapse:
        recoveries = [replace(r, note="; ".join(filter(None, [r.note, COLLAPSED_NOTE]))) for r in recoveries]
    record = AttackRecord(attack=result_folder(name, attack, settings, subject.seed), kind=name,
                          settings=asdict(settings),
                          metrics=result.metrics, seconds=round(time.perf_counter() - started, 1),
                          recovery=recoveries[0] if recoveries else None, curve=result.curve,
                          curve_metrics=list(result.curve_metrics), details=result.details, recoveries=recoveries)
    return record, _finish(subject, record, {"attacked": items, "recovery": vectors})


def with_run_seed(settings: Any, seed: int) -> Any:
    """The settings with an unset seed (None) replaced by the attacked run's."""
    return replace(settings, seed=seed) if getattr(settings, "seed", 0) is None else settings


def _finish(subject: Subject, record: AttackRecord, items: dict[str, Any]) -> Path | None:
    if subject.run_dir is None:
        return None
    attacks = attacks_dir(subject.run_dir)
    final = attacks / record.attack
    attacks.mkdir(parents=True, exist_ok=True)
    with staged_dir(final, overwrite=True, kind="attack") as stage:
        write_json_atomic(stage / "metrics.json", record.to_json())
        write_json_atomic(stage / ITEMS_FILE, items)
    return final


def attacks_dir(run_dir: Path) -> Path:
    attacks = run_dir / "attacks"
    if attacks.is_symlink() or (attacks.exists() and not attacks.is_dir()):
        # A received run folder must not redirect (or make us replace) results outside itself.
        raise UserError(f"{attacks} is not a plain folder inside the run; results are not written through it")
    return attacks


def subject_from_run(run_dir: Path, eval_overrides: dict[str, Any] | None = None,
                     trust_remote_code: bool = False, device: str | None = None, dtype: str | None = None) -> Subject:
    """The run's model on the run's own benchmark; `eval_overrides` ({"eval.engine": ...}) change how it is
    scored, never what it is scored on."""
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    if not (run_dir / "model" / "config.json").is_file():
        raise UserError(f"run folder {run_dir} has no model/ (was it written by `unlearn run`?)")
    attacks_dir(run_dir)  # checked before anything is loaded
    saved = read_yaml(run_dir / "config.yaml")
    settings = dict(saved.get("eval") or {})
    settings.update({k.removeprefix("eval."): v for k, v in (eval_overrides or {}).items()})
    record = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    task: Task = load_task(saved.get("benchmark", {}))
    # The precision the run trained in unless `dtype` says otherwise; never its device: the GPU a run trained on
    # need not exist where it is evaluated.
    train = saved.get("train") if isinstance(saved.get("train"), dict) else {}
    trained_in = train.get("dtype") if isinstance(train.get("dtype"), str) else None
    seed = train.get("seed", 0)
    return Subject(model_spec=str(run_dir / "model"), task=task, eval_settings=eval_config(settings),
                   seed=seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else 0,
                   collapse=collapse_of(run_dir / "metrics.json", record) if record else [],
                   target_model=_target_model(saved.get("target_model")), trust_remote_code=trust_remote_code,
                   run_dir=run_dir, unlearned=record.get("metrics"), target=record.get("target"),
                   items=read_items(run_dir / ITEMS_FILE),
                   placement=_run_placement(saved, train, device, dtype or trained_in))


def _run_placement(saved: dict[str, Any], train: dict[str, Any], device: str | None, dtype: str | None) -> Placement:
    """Where a run's model is evaluated or attacked: the given device, in the precision it trained in (its compute
    dtype and the precision mode its optimizer resolved to, so a re-evaluation computes what the run did)."""
    precision = train.get("precision") if isinstance(train.get("precision"), str) else "auto"
    optimizer = saved.get("optimizer") if isinstance(saved.get("optimizer"), dict) else {}
    cls = OPTIMIZERS.get(optimizer.get("name")) if isinstance(optimizer.get("name"), str) else None
    gradients = bool(getattr(cls, "uses_gradients", True))
    return resolve_placement(device or "auto", dtype or "auto", precision).for_training(gradients)


def _target_model(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise UserError(f"the run's config.yaml has a malformed target_model: {shown(value)}")
    return value

