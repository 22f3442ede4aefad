"""Sign grade: every weight moves by ±lr. signSGD and Signum come from pytorch-optimizer's SignSGD.

* ``signsgd``: sign of the gradient (momentum 0; the library defaults to 0.9, which is Signum).
* ``signum``: sign of the momentum m = β·m + (1 − β)·g.
* ``signadam``: the sign of Adam's update m̂/(√v̂ + ε). The denominator is positive, so that sign is
  sign(m) with Adam's first moment: signAdam *is* Signum with β = β1, and keeping v would change nothing
  but the memory. It is registered under its own name, with Adam's option names, because the literature
  and user configs speak of it that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytorch_optimizer

from unlearn.core.settings import NON_NEGATIVE, UNIT_OPEN, setting
from unlearn.optim.protocol import OPTIMIZERS, BackwardStep, read_settings


class _Sign(BackwardStep, pytorch_optimizer.SignSGD):
    grade = "sign"

    def _build(self, params: Any, lr: float, momentum: float, weight_decay: float, weight_decouple: bool,
               maximize: bool) -> None:
        pytorch_optimizer.SignSGD.__init__(self, params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                           weight_decouple=weight_decouple, maximize=maximize)


@OPTIMIZERS.register("signsgd")
class SignSGD(_Sign):
    @dataclass(frozen=True)
    class Settings:
        lr: float = setting(1e-3, limit=NON_NEGATIVE)
        momentum: float = setting(0.0, limit=UNIT_OPEN)  # the library's default is 0.9, which is Signum
        weight_decay: float = 0.0
        weight_decouple: bool = True
        maximize: bool = False

    def __init__(self, params: Any, **options: Any) -> None:
        s = read_settings(type(self), options)
        self._build(params, s.lr, s.momentum, s.weight_decay, s.weight_decouple, s.maximize)


@OPTIMIZERS.register("signum")
class Signum(SignSGD):
    @dataclass(frozen=True)
    class Settings(SignSGD.Settings):  # signSGD's, with momentum
        lr: float = setting(1e-5, limit=NON_NEGATIVE)
        momentum: float = setting(0.9, limit=UNIT_OPEN)


@OPTIMIZERS.register("signadam")
class SignAdam(_Sign):
    @dataclass(frozen=True)
    class Settings:
        lr: float = setting(1e-5, limit=NON_NEGATIVE)
        # betas[1] (v's decay) is accepted for Adam-compatible configs; it cannot change the sign (docstring).
        betas: tuple[float, float] = (0.9, 0.999)
        weight_decay: float = 0.0
        maximize: bool = False

    def __init__(self, params: Any, **options: Any) -> None:
        s = read_settings(type(self), options)
        self._build(params, s.lr, float(s.betas[0]), s.weight_decay, True, s.maximize)
