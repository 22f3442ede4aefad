"""Membership inference attack: can the forget items still be told apart from items the model never saw?

Six scores (unlearn/evaluation/membership.py: LOSS, ZLib, Min-K%, Min-K%++, GradNorm, Reference), each giving the
ROC AUC of the forget items (members) against the benchmark's holdout items (non-members), as OpenUnlearning's
mia_* metrics do, with a 95 % bootstrap interval over items (each group resampled within itself). The attacked model
is scored, and so is the target model the run started from: the recovery ratio of an MIA is the share of the
target's membership signal the score still finds, (AUC − 0.5) / (AUC_target − 0.5), over the same resampled items.
0.5 means no signal; under 0.5 the forget items look *less* familiar than unseen ones, itself a tell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from unlearn.attacks.base import ATTACKS, Attack, AttackResult, Subject
from unlearn.compute.models import load_model
from unlearn.core.errors import UserError
from unlearn.core.settings import AT_LEAST_ONE, Limit, setting
from unlearn.evaluation.stats import roc_auc, two_sample_bootstrap
from unlearn.storage.records import Recovery
from unlearn.tasks.data import Encoded

if TYPE_CHECKING:
    from unlearn.evaluation.membership import TokenStats

SCORES = ("min_k", "min_k_plus_plus", "loss", "zlib", "gradnorm", "reference")
TITLES = {"min_k": "Min-K%", "min_k_plus_plus": "Min-K%++", "loss": "LOSS", "zlib": "ZLib", "gradnorm": "GradNorm",
          "reference": "Reference"}
REFERENCE_NOTE = "mia/reference_auc not computed: the Reference attack needs attack.reference_model"


@dataclass
class MiaSettings:
    scores: list[str] = field(default_factory=lambda: list(SCORES))  # the first is the headline
    k: float = setting(0.4, limit=Limit(gt=0, le=1))  # Min-K% and Min-K%++: the fraction of tokens (OpenUnlearning)
    p: float = setting(2.0, limit=Limit(choices=(1.0, 2.0)))  # GradNorm's norm
    reference_model: str | None = None  # a model that saw neither set (e.g. the base model before the target)
    resamples: int = setting(1000, limit=AT_LEAST_ONE)  # bootstrap resamples of the intervals
    max_length: int | None = setting(None, limit=AT_LEAST_ONE)  # tokens per item; None: whole, up to the context
    seed: int | None = None  # of the bootstrap; None: the run's seed


@dataclass
class Scored:
    """One model's scores, per score name, on the members and the non-members."""

    members: dict[str, list[float]]
    nonmembers: dict[str, list[float]]


@ATTACKS.register("mia")
class Mia(Attack):
    Settings = MiaSettings
    summary = "membership inference: ROC AUC of forget vs holdout items, six scores (the model is not changed)"
    measurement_only = ("scores", "k", "p", "reference_model", "resamples", "max_length", "seed")

    def folder(self, settings: MiaSettings) -> str:
        return "mia"

    def check(self, subject: Subject, settings: MiaSettings) -> None:
        unknown = [s for s in settings.scores if s not in SCORES]
        if unknown or not settings.scores or len(set(settings.scores)) != len(settings.scores):
            raise UserError(f"attack.scores must be distinct names among {', '.join(SCORES)}, got {settings.scores}")
        if subject.task.membership() is None:
            raise UserError(f"benchmark '{subject.task.name}' has no holdout set: membership inference needs items "
                            "the model never saw (embedded, MUSE's privleak/holdout, TOFU's holdoutNN)")
        if settings.reference_model is not None and not settings.reference_model.strip():
            raise UserError("attack.reference_model must name a model")

    def run(self, subject: Subject, settings: MiaSettings, progress: bool = True) -> AttackResult:
        membership = subject.task.membership()
        assert membership is not None  # check() refused the benchmark otherwise
        wanted = [s for s in settings.scores if s != "reference" or settings.reference_model is not None]
        notes = [REFERENCE_NOTE] if "reference" in settings.scores and settings.reference_model is None else []
        reference = None
        if settings.reference_model is not None and "reference" in wanted:
            reference = self._stats(settings.reference_model, subject, membership, settings, progress)
        attacked = self._score(subject.model_spec, subject, membership, settings, wanted, reference, progress)
        target = (self._score(subject.target_model, subject, membership, settings, wanted, reference, progress)
                  if subject.target_model else None)
        seed = settings.seed if settings.seed is not None else subject.seed
        metrics, target_metrics = _aucs(attacked, wanted, settings, seed), None
        recoveries = []
        if target is not None:
            target_metrics = _aucs(target, wanted, settings, seed)
            recoveries = [_signal_left(f"mia/{name}_auc", name, attacked, target, membership.measured_on, settings,
                                       seed) for name in wanted]
        details: dict[str, Any] = {"members": len(membership.members), "nonmembers": len(membership.nonmembers),
                                   "measured_on": membership.measured_on, "notes": notes, "target": target_metrics}
        return AttackResult(metrics=metrics, details=details, recoveries=recoveries)

    def _stats(self, spec: str, subject: Subject, membership: Any, settings: MiaSettings,
               progress: bool) -> tuple[list[TokenStats], list[TokenStats]]:
        from unlearn.evaluation.measures import metric_scope
        from unlearn.evaluation.membership import token_stats

        loaded = load_model(spec, trust_remote_code=subject.trust_remote_code, placement=subject.placement)
        try:
            items = self._items(loaded, membership, settings)
            size, budget = subject.eval_settings.batch_size, subject.eval_settings.max_batch_tokens
            with metric_scope("mia/reference", progress):
                return (token_stats(loaded.model, loaded.tokenizer, items[0], size, budget),
                        token_stats(loaded.model, loaded.tokenizer, items[1], size, budget))
        finally:
            del loaded

    @staticmethod
    def _items(loaded: Any, membership: Any, settings: MiaSettings) -> tuple[list[Encoded], list[Encoded]]:
        from unlearn.evaluation.measures import model_context
        from unlearn.evaluation.membership import encoded

        context = model_context(loaded.model)
        limit = min(x for x in (settings.max_length, context) if x) if (settings.max_length or context) else None
        return (encoded(loaded.tokenizer, membership.members, limit),
                encoded(loaded.tokenizer, membership.nonmembers, limit))

    def _score(self, spec: str, subject: Subject, membership: Any, settings: MiaSettings, wanted: list[str],
               reference: tuple[list[TokenStats], list[TokenStats]] | None, progress: bool) -> Scored:
        # Imported here: listing the attacks (registry discovery) should not pay for the evaluation stack.
        from unlearn.evaluation.measures import metric_scope
        from unlearn.evaluation.membership import (
            grad_norms,
            loss_score,
            min_k_plus_plus_score,
            min_k_score,
            reference_score,
            token_stats,
            zlib_score,
        )

        loaded = load_model(spec, trust_remote_code=subject.trust_remote_code, placement=subject.placement)
        model, tokenizer = loaded.model, loaded.tokenizer
        size, budget = subject.eval_settings.batch_size, subject.eval_settings.max_batch_tokens
        out = Scored({}, {})
        try:
            for side, items, ref in zip(("members", "nonmembers"), self._items(loaded, membership, settings),
                                        reference or (None, None), strict=True):
                with metric_scope(f"mia/{side}", progress):
                    stats = token_stats(model, tokenizer, items, size, budget)
                scores: dict[str, list[float]] = {
                    "loss": [loss_score(s) for s in stats], "zlib": [zlib_score(s) for s in stats],
                    "min_k": [min_k_score(s, settings.k) for s in stats],
                    "min_k_plus_plus": [min_k_plus_plus_score(s, settings.k) for s in stats]}
                if ref is not None:
                    scores["reference"] = [reference_score(s, r) for s, r in zip(stats, ref, strict=True)]
                if "gradnorm" in wanted:
                    with metric_scope(f"mia/gradnorm_{side}", progress), torch.enable_grad():
                        scores["gradnorm"] = grad_norms(model, tokenizer, items, settings.p)
                getattr(out, side).update({name: scores[name] for name in wanted})
        finally:
            del model, loaded
        return out


def _aucs(scored: Scored, wanted: list[str], settings: MiaSettings, seed: int) -> dict[str, float]:
    """mia/<score>_auc with its 95 % interval (`_low`, `_high`), each set resampled within itself."""
    out: dict[str, float] = {}
    for name in wanted:
        key = f"mia/{name}_auc"
        interval = two_sample_bootstrap(scored.members[name], scored.nonmembers[name],
                                        lambda a, b: roc_auc(a[:, 0], b[:, 0]), resamples=settings.resamples, seed=seed)
        out |= {key: interval.value, f"{key}_low": interval.low, f"{key}_high": interval.high}
    return out


def _signal_left(key: str, name: str, attacked: Scored, target: Scored, measured_on: str, settings: MiaSettings,
                 seed: int) -> Recovery:
    """The share of the target's membership signal the score still finds, with its interval over the same items."""
    def ratio(a: np.ndarray, b: np.ndarray) -> float:
        gap = roc_auc(a[:, 1], b[:, 1]) - 0.5
        return (roc_auc(a[:, 0], b[:, 0]) - 0.5) / gap if abs(gap) > 1e-9 else math.nan

    members = np.column_stack([attacked.members[name], target.members[name]])
    nonmembers = np.column_stack([attacked.nonmembers[name], target.nonmembers[name]])
    auc, auc_target = roc_auc(members[:, 0], nonmembers[:, 0]), roc_auc(members[:, 1], nonmembers[:, 1])
    what = f"{TITLES[name]} AUC, {measured_on}: the share of the target's membership signal left"
    if auc_target <= 0.5 + 1e-9:
        return Recovery(metric=key, measured_on=what, ratio=None, unlearned=auc, attacked=auc, target=auc_target,
                        note="undefined: the target model's forget items are not detected (AUC_target <= 0.5)")
    interval = two_sample_bootstrap(members, nonmembers, ratio, resamples=settings.resamples, seed=seed)
    low, high = (None, None) if not math.isfinite(interval.low) else (round(interval.low, 4), round(interval.high, 4))
    return Recovery(metric=key, measured_on=what, ratio=interval.value, note="ok", unlearned=auc, attacked=auc,
                    target=auc_target, low=low, high=high, n=interval.n)
