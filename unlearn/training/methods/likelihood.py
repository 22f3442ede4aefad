"""Methods built on the target tokens' likelihood: gradient ascent, gradient difference, and gradient difference
with a KL term to the starting model on retain text."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unlearn.core.settings import setting
from unlearn.optim.loss import Loss
from unlearn.tasks.scoring import mean_token_nll, target_logits
from unlearn.training.methods.base import METHODS, WEIGHT, Method


@METHODS.register("gradascent", "ga")
class GradAscent(Method):
    """L = -NLL(forget): push the forget answers' likelihood down, nothing else."""

    def __call__(self, model, forget, retain):
        return Loss({"forget": -mean_token_nll(model, forget)})


@METHODS.register("graddiff")
class GradDiff(Method):
    """L = gamma * (-NLL(forget)) + alpha * NLL(retain)."""

    @dataclass(frozen=True)
    class Settings:
        gamma: float = setting(1.0, limit=WEIGHT)
        alpha: float = setting(1.0, limit=WEIGHT)

    def __call__(self, model, forget, retain):
        s = self.settings
        return Loss({"forget": -s.gamma * mean_token_nll(model, forget),
                     "retain": s.alpha * mean_token_nll(model, retain)})


def kl_to_reference(model: torch.nn.Module, reference: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(p_ref || p_model) over the vocabulary at each target token's position, averaged over those positions."""
    log_p = torch.log_softmax(target_logits(model, batch).float(), dim=-1)
    with torch.no_grad():
        log_ref = torch.log_softmax(target_logits(reference, batch).float(), dim=-1)
    # batchmean divides the summed KL by the first dimension: the number of target positions.
    return F.kl_div(log_p, log_ref, reduction="batchmean", log_target=True)


@METHODS.register("kl-retain", "klretain")
class KLRetain(Method):
    """GradDiff with a KL term to the starting model on retain text instead of the retain NLL.

    TOFU's "KL" baseline: L = gamma * (-NLL(forget)) + alpha * KL(p_start || p_theta) on retain target tokens.

    The starting model is a frozen copy held beside the trained one (its weights again, on its device).
    OpenUnlearning averages the KL over every position of the padded batch, prompt and padding included; here it is
    averaged over the retain target tokens, the ones GradDiff's retain NLL reads."""

    @dataclass(frozen=True)
    class Settings:
        gamma: float = setting(1.0, limit=WEIGHT)
        alpha: float = setting(1.0, limit=WEIGHT)

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.reference: torch.nn.Module | None = None

    @property
    def copies_model(self) -> bool:
        return True

    def prepare(self, model, forget, retain, pad_id, batch_size, retain_used=None):
        self.reference = copy.deepcopy(model).requires_grad_(False).eval()

    def __call__(self, model, forget, retain):
        if self.reference is None:
            raise RuntimeError("KLRetain.prepare() must run before training (no reference model)")
        s = self.settings
        return Loss({"forget": -s.gamma * mean_token_nll(model, forget),
                     "retain": s.alpha * kl_to_reference(model, self.reference, retain)})
