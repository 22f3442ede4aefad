"""First-order grade: the torch optimizers, driven through the closure protocol."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from unlearn.core.settings import NON_NEGATIVE, POSITIVE, setting
from unlearn.optim.protocol import OPTIMIZERS, BackwardStep, read_settings


@OPTIMIZERS.register("adamw")
class AdamW(BackwardStep, torch.optim.AdamW):
    grade = "first-order"
    sharded_parameters = True  # torch's update runs on FSDP's parameter shards (DTensors) as they are

    @dataclass(frozen=True)
    class Settings:  # torch.optim.AdamW's, with its defaults
        lr: float = setting(1e-3, limit=NON_NEGATIVE)
        betas: tuple[float, float] = (0.9, 0.999)
        eps: float = setting(1e-8, limit=POSITIVE)
        weight_decay: float = setting(1e-2, limit=NON_NEGATIVE)
        amsgrad: bool = False
        maximize: bool = False

    def __init__(self, params: Any, **options: Any) -> None:
        torch.optim.AdamW.__init__(self, params, **asdict(read_settings(type(self), options)))


@OPTIMIZERS.register("sgd")
class SGD(BackwardStep, torch.optim.SGD):
    grade = "first-order"
    sharded_parameters = True

    @dataclass(frozen=True)
    class Settings:  # torch.optim.SGD's, with its defaults
        lr: float = setting(1e-3, limit=NON_NEGATIVE)
        momentum: float = setting(0.0, limit=NON_NEGATIVE)
        dampening: float = 0.0
        weight_decay: float = setting(0.0, limit=NON_NEGATIVE)
        nesterov: bool = False
        maximize: bool = False

    def __init__(self, params: Any, **options: Any) -> None:
        torch.optim.SGD.__init__(self, params, **asdict(read_settings(type(self), options)))
