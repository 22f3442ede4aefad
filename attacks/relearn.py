"""Relearning attack: fine-tune the unlearned model on part of the forget text, measure what comes back.

If unlearning only hid the knowledge, a handful of steps on *some* forget text brings back the rest too. The
benchmark says what to fine-tune on and what to measure (`Task.relearn_plan`): on the embedded benchmark the
forget facts are split (seeded) and recovery is measured on the facts the attack never saw; on WMDP and MUSE
the attack fine-tunes on part of the forget corpus and the benchmark's forget metric is measured. It is
measured at several checkpoints, giving a recovery curve. The out-of-domain variant fine-tunes on retain text
instead, which tells apart "knowledge came back" from "any fine-tuning shakes things loose".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearn.attacks.base import ATTACKS, Attack, AttackResult, Subject
from unlearn.compute.models import load_model
from unlearn.compute.placement import CPU_FP32, Placement
from unlearn.core.errors import UserError
from unlearn.core.settings import AT_LEAST_ONE, POSITIVE, SEED, Limit, setting
from unlearn.optim.protocol import build_optimizer
from unlearn.optim.rounding import use_precision
from unlearn.tasks.data import encode
from unlearn.tasks.task import RelearnPlan
from unlearn.training.adapters import add_lora, merge_lora
from unlearn.training.loop import train
from unlearn.training.methods import LanguageModeling

DOMAINS = ("forget", "retain")


@dataclass
class RelearnSettings:
    samples: int | None = setting(None, limit=AT_LEAST_ONE)  # forget items to fine-tune on; default half of them
    steps: int = setting(50, limit=AT_LEAST_ONE)
    lr: float = setting(2e-5, limit=POSITIVE)
    batch_size: int = setting(4, limit=AT_LEAST_ONE)
    lora: bool = False
    lora_rank: int = setting(16, limit=AT_LEAST_ONE)
    domain: str = setting("forget", limit=Limit(choices=DOMAINS))  # "retain" = out-of-domain: retain text
    checkpoints: list[int] = setting(default_factory=lambda: [0, 10, 25, 50, 100])
    seed: int | None = setting(None, limit=SEED)  # None: the attacked run's train.seed (0 for a model)

    def __post_init__(self) -> None:
        if any(c < 0 for c in self.checkpoints):
            raise UserError(f"relearning checkpoints must be steps >= 0, got {self.checkpoints}")

    @property
    def name(self) -> str:
        kind = "relearn" if self.domain == "forget" else "relearn-ood"
        return kind + ("-lora" if self.lora else "")


def relearn(model: torch.nn.Module, tokenizer, plan: RelearnPlan, settings: RelearnSettings, eval_settings: Any,
            progress: bool = True, max_length: int = 256,
            start: dict[str, float] | None = None,
            placement: Placement = CPU_FP32) -> tuple[torch.nn.Module, list[dict[str, float]], float]:
    """Run the attack in place: (the attacked model, merged if LoRA; the curve; training seconds). `start`: the
    probe of this very model, already measured (it is then not measured again at step 0). `placement`: the one
    the model was loaded for (its precision decides how updates are added)."""
    items = [encode(tokenizer, ex, max_length=max_length) for ex in plan.train]
    checkpoints = sorted({c for c in settings.checkpoints if 0 <= c <= settings.steps} | {0, settings.steps})
    curve: list[dict[str, float]] = []

    def measure(step: int) -> None:
        if step == 0 and start is not None:
            curve.append({"step": 0, **start})
        elif step in checkpoints:
            model.eval()
            curve.append({"step": step, **plan.probe(model, tokenizer, eval_settings)})

    seed = settings.seed or 0  # run_attack fills in the run's seed; 0 for a direct call without one
    torch.manual_seed(seed)
    if settings.lora:
        model.requires_grad_(True)  # adapters on every linear layer
        model = add_lora(model, settings.lora_rank)
    measure(0)
    optimizer = build_optimizer("adamw", model.parameters(), lr=settings.lr, weight_decay=0.0)
    use_precision(optimizer, placement, seed)
    result = train(model, LanguageModeling(), optimizer, items, None, pad_id=tokenizer.pad_token_id,
                   batch_size=settings.batch_size, max_steps=settings.steps, seed=seed,
                   desc=settings.name, progress=progress, after_step=measure, rounded=placement.stochastic)
    if settings.lora:
        model = merge_lora(model, seed if placement.stochastic else None)
    return model.eval(), curve, result.seconds


@ATTACKS.register("relearn")
class Relearn(Attack):
    """Fine-tune (AdamW, optionally through LoRA) on what the benchmark's relearn plan gives, measuring its probe
    at each checkpoint; then evaluate the attacked model fully."""

    Settings = RelearnSettings
    summary = "fine-tune on part of the forget text (or retain text: out-of-domain); recovery curve"
    named_by = ("domain", "lora")
    measurement_only = ("checkpoints",)

    @staticmethod
    def short_form(out_of_domain: bool, checkpoints: str | None) -> dict[str, Any]:
        """The settings `--out-of-domain` and `--checkpoints 0,5,10` stand for (the others are named as the
        settings are); a one-line error for checkpoints that are not comma-separated integers."""
        flags: dict[str, Any] = {"domain": "retain"} if out_of_domain else {}
        if checkpoints is not None:
            try:
                flags["checkpoints"] = [int(x) for x in checkpoints.split(",") if x.strip()]
            except ValueError:
                raise UserError(f"--checkpoints expects comma-separated integers, got '{checkpoints}'") from None
        return flags

    def folder(self, settings: RelearnSettings) -> str:
        return settings.name

    def check(self, subject: Subject, settings: RelearnSettings) -> None:
        subject.task.relearn_plan(settings.domain, settings.samples, settings.seed)  # a bad --samples fails now
        if subject.target_model and not _exists(subject.target_model):
            # Checked before minutes of fine-tuning: the recovery ratio needs the target model at the end.
            raise UserError(f"the run's target model {subject.target_model} is gone (cache cleared?); "
                            "recreate it with `unlearn prepare` using the run's config")

    def run(self, subject: Subject, settings: RelearnSettings, progress: bool = True) -> AttackResult:
        plan = subject.task.relearn_plan(settings.domain, settings.samples, settings.seed)
        placement = subject.placement.for_training(True)  # fine-tuned with AdamW, whatever the run's optimizer
        loaded = load_model(subject.model_spec, trust_remote_code=subject.trust_remote_code, placement=placement)
        start_key = _probe_key(subject.model_spec, subject, plan, settings)
        known = _PROBES.get(start_key) if start_key else None
        model, curve, seconds = relearn(loaded.model, loaded.tokenizer, plan, settings, subject.eval_settings,
                                        progress, subject.task.train_max_length,
                                        dict(known) if known is not None else None, placement)
        if start_key and known is None:
            _PROBES[start_key] = {k: v for k, v in curve[0].items() if k != "step"}
        metrics = subject.task.evaluate(model, loaded.tokenizer, subject.eval_settings, progress=progress)
        del model, loaded
        target_probe = None
        if subject.target_model:
            key = _probe_key(subject.target_model, subject, plan, settings)
            target_probe = _PROBES.get(key) if key else None
            if target_probe is None:
                # The target measured exactly as the curve is (the same held-out items): like is compared with like.
                target = load_model(subject.target_model, trust_remote_code=subject.trust_remote_code,
                                    placement=placement)
                target_probe = plan.probe(target.model.eval(), target.tokenizer, subject.eval_settings)
                del target
                if key:
                    _PROBES[key] = target_probe
            target_probe = dict(target_probe)
        return AttackResult(metrics=metrics, curve=curve, curve_metrics=plan.probe_metrics,
                            target_probe=target_probe, measured_on=plan.measured_on, curve_items=plan.items,
                            details={**plan.details, "train_seconds": round(seconds, 1)})


# A saved model's probe depends only on the model, the benchmark, the items the plan holds out and how they are
# scored. In a study the target is shared by every run of a seed, and a run's relearning and out-of-domain attacks
# start from the same model and measure the same held-out items; so each is measured once per process instead of
# once per attack (the same model scoring the same items: identical values, about 10 s saved each time).
_PROBES: dict[str, dict[str, float]] = {}


def _probe_key(spec: str, subject: Subject, plan: RelearnPlan, settings: RelearnSettings) -> str | None:
    folder = Path(spec)
    if not folder.is_dir():
        return None  # a hub name: its files are not ours to vouch for
    stamp = max((f.stat().st_mtime_ns for f in folder.iterdir() if f.is_file()), default=0)
    # The task's fingerprint changes whenever its data does (the same key the target and baseline caches use);
    # the plan's details name what it holds out (the probe is a function of them, whichever domain is trained on).
    return json.dumps([str(folder.resolve()), stamp, subject.task.name, subject.task.fingerprint, plan.details,
                       plan.measured_on, [m.key for m in plan.probe_metrics], settings.lora,
                       repr(subject.eval_settings), repr(subject.placement.for_training(True))],
                      sort_keys=True, default=str)


def _exists(spec: str) -> bool:
    """A target given as a folder must still be there; a hub id or an embedded alias cannot be checked here."""
    path = Path(spec)
    return path.is_dir() or not (path.is_absolute() or spec.startswith("."))
