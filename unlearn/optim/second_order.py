"""Second-order grade: Sophia with Hutchinson's diagonal Hessian estimate (pytorch-optimizer's SophiaH).

Every ``update_period`` steps the library estimates diag(∇²L) from Hessian-vector products, which need
the gradient's own graph: on those steps (only) the closure is differentiated with ``create_graph=True``.
The update is the clipped ratio clip(m / max(h, ε), ±ρ)·lr, with m, h exponential averages.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pytorch_optimizer
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from unlearn.core.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Limit, setting
from unlearn.optim.protocol import OPTIMIZERS, Closure, backward, read_settings, require_closure


@OPTIMIZERS.register("sophia")
class Sophia(pytorch_optimizer.SophiaH):
    grade = "second-order"
    uses_gradients = True
    # The library estimates the Hessian inside step() from each process's own gradient graph: several processes
    # would each hold a different estimate, and drift apart.
    data_parallel = False

    @dataclass(frozen=True)
    class Settings:
        lr: float = setting(1e-5, limit=NON_NEGATIVE)
        betas: tuple[float, float] = (0.96, 0.99)
        weight_decay: float = 0.0
        clip: float = setting(0.01, limit=POSITIVE)  # ρ: the update is clipped to ±ρ·lr
        update_period: int = setting(10, limit=AT_LEAST_ONE)
        num_samples: int = setting(1, limit=AT_LEAST_ONE)
        hessian_distribution: str = setting("gaussian", limit=Limit(choices=("gaussian", "rademacher")))
        eps: float = 1e-12

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        s = read_settings(type(self), options)
        super().__init__(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, p=s.clip,
                         update_period=s.update_period, num_samples=s.num_samples,
                         hessian_distribution=s.hessian_distribution, eps=s.eps)  # type: ignore[arg-type]
        self.steps_taken = 0

    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        closure = require_closure(closure)
        hessian_step = self.steps_taken % self.update_period == 0  # the library's own schedule
        # Hessian-vector products differentiate the backward pass itself; fused attention kernels (flash /
        # memory-efficient SDPA) have no double backward, the math kernel does: use it on those steps only.
        kernels = sdpa_kernel([SDPBackend.MATH]) if hessian_step else nullcontext()
        with torch.enable_grad(), kernels, warnings.catch_warnings():
            # torch warns that create_graph=True ties each parameter to its gradient in a reference cycle
            # unless .grad is reset to None afterwards, which zero_grad(set_to_none=True) below does.
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            loss = backward(closure, [p for g in self.param_groups for p in g["params"]], create_graph=hessian_step)
            # The library's Hessian-vector products run inside its step(): under gradient checkpointing they
            # recompute the layers, which must take the same (math) attention kernel as the forward did.
            super().step()
        self.zero_grad(set_to_none=True)  # also drops the graph kept for the Hessian-vector products
        self.steps_taken += 1
        return loss
