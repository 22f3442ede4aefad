"""Sign grade: signSGD from pytorch-optimizer, driven through the closure protocol."""

from __future__ import annotations

from collections.abc import Iterable

import pytorch_optimizer
import torch

from unlearn.optim.protocol import BackwardStep, register


@register("signsgd")
class SignSGD(BackwardStep, pytorch_optimizer.SignSGD):
    grade = "sign"

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        weight_decouple: bool = True,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        # momentum defaults to 0 (the library defaults to 0.9, i.e. Signum): "signsgd" should mean the
        # plain sign of the gradient; momentum stays available as an option.
        # An explicit signature (no **kwargs) so misspelled options are rejected, not swallowed.
        if lr < 0:  # the library raises a non-ValueError exception for this; keep the one-line contract
            raise ValueError(f"lr must be >= 0, got {lr}")
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            weight_decouple=weight_decouple,
            foreach=foreach,
            maximize=maximize,
        )
