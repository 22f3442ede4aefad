"""Run an attack against a run folder (or any model) and record it like `unlearn eval` does.

Results go to runs/<name>/attacks/<attack>/metrics.json, staged and renamed into place, with the
same metrics as `unlearn eval` plus a recovery ratio:
    (acc_attacked - acc_unlearned) / (acc_target - acc_unlearned)
0 = nothing came back, 1 = everything did. It is undefined (reported as null, with the reason)
when unlearning removed nothing, since then there is nothing to recover.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn.attacks.quantize import QuantSpec, load_quantized
from unlearn.attacks.relearn import RelearnSettings, relearn, split_forget, unseen_accuracy
from unlearn.benchmarks.embedded import TaskData
from unlearn.config import EvalConfig, eval_config
from unlearn.errors import UserError
from unlearn.files import read_json, write_json_atomic
from unlearn.models import load_model, load_tokenizer
from unlearn.runs import staged_dir
from unlearn.task import Task


@dataclass
class Subject:
    """What is attacked: a model, the benchmark it is scored on, and (for runs) where results go."""

    model_spec: str
    task: Task
    run_dir: Path | None
    unlearned: dict[str, float] | None  # metrics of the unlearned model, from the run
    target: dict[str, float] | None  # metrics of the target model before unlearning
    target_model: str | None
    eval_settings: EvalConfig
    trust_remote_code: bool = False  # from the command-line flag only, never from the run's config


def recovery_ratio(attacked: float, unlearned: float, target: float) -> tuple[float | None, str]:
    gap = target - unlearned
    if gap <= 1e-9:
        return None, "undefined: unlearning did not lower accuracy below the target's"
    return (attacked - unlearned) / gap, "ok"


def _finish(subject: Subject, name: str, record: dict[str, Any]) -> Path | None:
    if subject.run_dir is None:
        return None
    attacks = _attacks_dir(subject.run_dir)
    final = attacks / name
    attacks.mkdir(parents=True, exist_ok=True)
    with staged_dir(final, overwrite=True, kind="attack") as stage:
        write_json_atomic(stage / "metrics.json", record)
    return final


def _attacks_dir(run_dir: Path) -> Path:
    attacks = run_dir / "attacks"
    if attacks.is_symlink() or (attacks.exists() and not attacks.is_dir()):
        # A received run folder must not redirect (or make us replace) results outside itself.
        raise UserError(f"{attacks} is not a plain folder inside the run; results are not written through it")
    return attacks


def evaluate_subject(model, tokenizer, subject: Subject, progress: bool) -> dict[str, float]:
    return subject.task.evaluate(model, tokenizer, subject.eval_settings, progress=progress)


def quantize_attack(subject: Subject, spec: QuantSpec, progress: bool = True) -> tuple[dict[str, Any], Path | None]:
    started = time.perf_counter()
    tokenizer, source = load_tokenizer(subject.model_spec, subject.trust_remote_code)  # float weights never load
    model = load_quantized(source, spec, trust_remote_code=subject.trust_remote_code)
    metrics = evaluate_subject(model, tokenizer, subject, progress)
    record: dict[str, Any] = {"attack": spec.name, "kind": "quantize", "spec": spec.__dict__ | {"name": spec.name},
                              "metrics": metrics, "seconds": round(time.perf_counter() - started, 1)}
    if subject.unlearned and subject.target:
        key = subject.task.headline
        ratio, why = recovery_ratio(metrics[key], subject.unlearned[key], subject.target[key])
        record["recovery"] = {"ratio": ratio, "note": why, "measured_on": key}
    return record, _finish(subject, spec.name, record)


def relearn_attack(subject: Subject, settings: RelearnSettings,
                   progress: bool = True) -> tuple[dict[str, Any], Path | None]:
    if not isinstance(subject.task, TaskData):
        raise UserError(f"the relearning attack measures recovery on forget facts held out from relearning, which "
                        f"only the embedded benchmark provides; it is not available on '{subject.task.name}' yet")
    if subject.target_model and not Path(subject.target_model).is_dir():
        # Checked before minutes of fine-tuning: the recovery ratio needs the target model at the end.
        raise UserError(f"the run's target model {subject.target_model} is gone (cache cleared?); "
                        "recreate it with `unlearn prepare` using the run's config")
    split_forget(len(subject.task.forget), settings.samples, settings.seed)  # a bad --samples fails before loading
    started = time.perf_counter()
    loaded = load_model(subject.model_spec, trust_remote_code=subject.trust_remote_code)
    model, info = relearn(loaded.model, loaded.tokenizer, subject.task, settings, progress=progress)
    metrics = evaluate_subject(model, loaded.tokenizer, subject, progress)
    record: dict[str, Any] = {"attack": settings.name, "kind": "relearn", **info, "metrics": metrics}
    unseen = info["unseen_forget_indices"]
    unlearned_acc, attacked_acc = info["curve"][0]["forget_unseen_acc"], info["curve"][-1]["forget_unseen_acc"]
    if subject.target_model:
        # The target's accuracy on exactly the unseen facts: the ratio compares like with like.
        target = load_model(subject.target_model, trust_remote_code=subject.trust_remote_code)
        target_acc = unseen_accuracy(target.model, target.tokenizer, subject.task, unseen)
        del target
        record["recovery"] = {"measured_on": "forget facts not used for relearning",
                              "target_acc": target_acc, "unlearned_acc": unlearned_acc,
                              "attacked_acc": attacked_acc}
        per_step = []
        for point in info["curve"]:
            ratio, _ = recovery_ratio(point["forget_unseen_acc"], unlearned_acc, target_acc)
            per_step.append({"step": point["step"], "ratio": ratio})
        ratio, why = recovery_ratio(attacked_acc, unlearned_acc, target_acc)
        record["recovery"] |= {"ratio": ratio, "note": why, "curve": per_step}
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record, _finish(subject, settings.name, record)


def subject_from_run(run_dir: Path, load_task, eval_overrides: dict[str, Any] | None = None,
                     trust_remote_code: bool = False) -> Subject:
    """The run's model on the run's own benchmark; `eval_overrides` ({"eval.engine": ...}) change how it is
    scored, never what it is scored on."""
    from unlearn.config import read_yaml

    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    if not (run_dir / "model" / "config.json").is_file():
        raise UserError(f"run folder {run_dir} has no model/ (was it written by `unlearn run`?)")
    _attacks_dir(run_dir)  # checked before anything is loaded
    saved = read_yaml(run_dir / "config.yaml")
    settings = dict(saved.get("eval") or {})
    settings.update({k.removeprefix("eval."): v for k, v in (eval_overrides or {}).items()})
    record = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    return Subject(model_spec=str(run_dir / "model"), task=load_task(saved.get("benchmark", {})), run_dir=run_dir,
                   unlearned=record.get("metrics"), target=record.get("target"),
                   target_model=_target_model(saved.get("target_model")), eval_settings=eval_config(settings),
                   trust_remote_code=trust_remote_code)


def _target_model(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise UserError(f"the run's config.yaml has a malformed target_model: {value!r}")
    return value
