"""Sign grade: every weight moves by ±lr. signSGD and Signum come from pytorch-optimizer's SignSGD.

* ``signsgd``: sign of the gradient (momentum 0; the library defaults to 0.9, which is Signum).
* ``signum``: sign of the momentum m = β·m + (1 − β)·g.
* ``signadam``: the sign of Adam's update m̂/(√v̂ + ε). The denominator is positive, so that sign is
  sign(m) with Adam's first moment: signAdam *is* Signum with β = β1, and keeping v would change nothing
  but the memory. It is registered under its own name, with Adam's option names, because the literature
  and user configs speak of it that way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytorch_optimizer

from unlearn.optim.protocol import OPTIMIZERS, BackwardStep


class _Sign(BackwardStep, pytorch_optimizer.SignSGD):
    grade = "sign"

    def _build(self, params: Iterable[Any], lr: float, momentum: float, weight_decay: float,
               weight_decouple: bool, maximize: bool) -> None:
        if lr < 0:  # the library raises a non-ValueError exception for this; keep the one-line contract
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        pytorch_optimizer.SignSGD.__init__(self, params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                           weight_decouple=weight_decouple, maximize=maximize)


# Explicit signatures (no **kwargs) so misspelled options are rejected, not swallowed.
@OPTIMIZERS.register("signsgd")
class SignSGD(_Sign):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 weight_decouple: bool = True, maximize: bool = False) -> None:
        self._build(params, lr, momentum, weight_decay, weight_decouple, maximize)


@OPTIMIZERS.register("signum")
class Signum(_Sign):
    def __init__(self, params: Iterable[Any], lr: float = 1e-5, momentum: float = 0.9, weight_decay: float = 0.0,
                 weight_decouple: bool = True, maximize: bool = False) -> None:
        self._build(params, lr, momentum, weight_decay, weight_decouple, maximize)


@OPTIMIZERS.register("signadam")
class SignAdam(_Sign):
    def __init__(self, params: Iterable[Any], lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, maximize: bool = False) -> None:
        # betas[1] (v's decay) is accepted for Adam-compatible configs; it cannot change the sign (docstring).
        if len(betas) != 2:
            raise ValueError(f"betas must be two numbers, got {betas}")
        self._build(params, lr, float(betas[0]), weight_decay, True, maximize)
