"""Task-vector negation (Ilharco et al. 2023, "Editing Models with Task Arithmetic"; MUSE's Task Vector baseline):
fine-tune on the forget text, then move the starting weights away from the fine-tuned ones:
theta_out = theta_0 - alpha * (theta_ft - theta_0).

Training itself is plain fine-tuning (so every optimizer grade can run it); the edit happens in `finish`, after the
last step. The starting weights are kept in CPU memory (one copy of the trained parameters) from `prepare` on,
which runs on the starting model even when a run resumes from a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unlearn.core.settings import POSITIVE, setting
from unlearn.optim.loss import Loss
from unlearn.tasks.scoring import mean_token_nll
from unlearn.training.methods.base import METHODS, Method


@METHODS.register("task-vector", "taskvector")
class TaskVector(Method):
    """Task-vector negation: fine-tune on forget, then theta_0 - alpha * (theta_ft - theta_0).

    Training minimizes NLL(forget); alpha = 1 as in MUSE. During training the model (and its live probe) is the
    fine-tuned one; only the saved model is negated."""

    edits_after_training = True

    @dataclass(frozen=True)
    class Settings:
        alpha: float = setting(1.0, limit=POSITIVE)

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.start: dict[str, torch.Tensor] = {}

    def prepare(self, model, forget, retain, pad_id, batch_size, retain_used=None):
        self.start = {name: p.detach().to("cpu", torch.float32, copy=True)
                      for name, p in model.named_parameters() if p.requires_grad}

    def __call__(self, model, forget, retain):
        return Loss({"forget": mean_token_nll(model, forget)})

    @torch.no_grad()
    def finish(self, model):
        if not self.start:
            raise RuntimeError("TaskVector.prepare() must run before finish() (no starting weights)")
        alpha = self.settings.alpha
        for name, p in model.named_parameters():
            start = self.start.get(name)
            if start is None:
                continue
            start = start.to(p.device)
            # (1 + alpha) * theta_0 - alpha * theta_ft, in float32 whatever the weights' dtype.
            p.copy_(start.mul(1.0 + alpha).sub_(p.float(), alpha=alpha))
