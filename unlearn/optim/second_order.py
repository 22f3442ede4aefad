"""Second-order grade: Sophia with Hutchinson's diagonal Hessian estimate (pytorch-optimizer's SophiaH).

Every ``update_period`` steps the library estimates diag(∇²L) from Hessian-vector products, which need
the gradient's own graph: on those steps (only) the closure is differentiated with ``create_graph=True``.
The update is the clipped ratio clip(m / max(h, ε), ±ρ)·lr, with m, h exponential averages.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import pytorch_optimizer
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from unlearn.core.settings import check_int
from unlearn.optim.protocol import OPTIMIZERS, Closure, backward, require_closure


@OPTIMIZERS.register("sophia")
class Sophia(pytorch_optimizer.SophiaH):
    grade = "second-order"
    uses_gradients = True
    # The library estimates the Hessian inside step() from each process's own gradient graph: several processes
    # would each hold a different estimate, and drift apart.
    data_parallel = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-5, betas: tuple[float, float] = (0.96, 0.99),
                 weight_decay: float = 0.0, clip: float = 0.01, update_period: int = 10,
                 num_samples: int = 1, hessian_distribution: str = "gaussian", eps: float = 1e-12) -> None:
        if lr < 0 or clip <= 0:
            raise ValueError(f"lr must be >= 0 and clip > 0, got lr={lr}, clip={clip}")
        check_int("update_period", update_period)
        if hessian_distribution not in ("gaussian", "rademacher"):
            raise ValueError(f"hessian_distribution must be gaussian or rademacher, got '{hessian_distribution}'")
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, p=clip,
                         update_period=update_period, num_samples=num_samples,
                         hessian_distribution=hessian_distribution, eps=eps)  # type: ignore[arg-type]
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
