"""First-order grade: the torch optimizers, driven through the closure protocol."""

from __future__ import annotations

import torch

from unlearn.optim.protocol import OPTIMIZERS, BackwardStep


@OPTIMIZERS.register("adamw")
class AdamW(BackwardStep, torch.optim.AdamW):
    grade = "first-order"
    sharded_parameters = True  # torch's update runs on FSDP's parameter shards (DTensors) as they are


@OPTIMIZERS.register("sgd")
class SGD(BackwardStep, torch.optim.SGD):
    grade = "first-order"
    sharded_parameters = True
