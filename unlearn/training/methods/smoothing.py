"""Smoothness-enhanced NPO (Fan et al. 2025, "Towards LLM Unlearning Resilient to Relearning Attacks: A
Sharpness-Aware Minimization Perspective and Beyond"): the forget loss is taken at shifted weights, so training
flattens the forget loss's landscape around the unlearned model and a few relearning steps climb back out slower.

- SAM-NPO: the worst shift within radius rho, to first order: delta = rho * g / ||g|| with g the forget loss's
  gradient; the optimizer then differentiates l_f(theta + delta) (delta held fixed) plus the retain term at theta.
- RS-NPO: the forget loss averaged over Gaussian shifts delta ~ N(0, sigma^2 I), `samples` draws per step.

Both follow the paper's code in applying the shift to the forget term only. Defaults: rho = sigma = 0.01 (the
paper's MUSE scripts; its WMDP configs use 0.1 for a 7B model) and 3 noise samples (its RS trainer); the NPO
part keeps this toolkit's NPO defaults, so a comparison with `npo` isolates the smoothing.

The shifted weights are new tensors (p + delta) put in the modules' places for one forward, not an in-place edit:
the graph then holds the shifted values, and its gradient flows to p unchanged. That costs a second copy of the
trained weights during the forward (SAM also holds g), and it is why gradient checkpointing (which would recompute
the forward after the shift is gone) and FSDP shards are refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from unlearn.core.settings import AT_LEAST_ONE, NON_NEGATIVE, setting
from unlearn.optim.loss import Loss
from unlearn.optim.zo_directions import mix
from unlearn.tasks.scoring import mean_token_nll
from unlearn.training.methods.base import METHODS
from unlearn.training.methods.preference import NPO


@contextmanager
def shifted_weights(model: torch.nn.Module, shifts: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Inside, the model's forward sees p + shifts[id(p)] for each parameter p named there (every module holding a
    tied parameter sees the same shifted tensor); gradients of what is computed flow to p. The modules' own
    parameters are back in place, in their order, on exit."""
    params = {id(p): p for p in model.parameters() if id(p) in shifts}
    shifted = {key: params[key] + shift.to(params[key].dtype) for key, shift in shifts.items() if key in params}
    saved: list[tuple[torch.nn.Module, dict[str, torch.nn.Parameter | None], list[str]]] = []
    try:
        for module in model.modules():
            names = [n for n, p in module._parameters.items() if p is not None and id(p) in shifted]
            if not names:
                continue
            saved.append((module, dict(module._parameters), names))
            for name in names:
                tensor = shifted[id(module._parameters.pop(name))]
                # Not a Parameter, and no longer in _parameters: nn.Module keeps it as a plain attribute, which the
                # forward's `self.weight` reads first.
                setattr(module, name, tensor)
        yield
    finally:
        for module, original, names in reversed(saved):
            for name in names:
                module.__dict__.pop(name, None)
            module._parameters.clear()
            module._parameters.update(original)


def _trained(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@METHODS.register("sam-npo", "samnpo")
class SAMNPO(NPO):
    """NPO with sharpness-aware minimization of its forget term (Unlearn-Smooth's NPO+SAM).

    L = gamma * L_f(theta + rho * g/||g||) + alpha * NLL(retain), g = grad L_f(theta) (see the module docstring).
    Each micro-batch (and process) takes its own ascent step."""

    needs_gradients = True
    shifts_weights = True

    @dataclass(frozen=True)
    class Settings(NPO.Settings):
        rho: float = setting(0.01, limit=NON_NEGATIVE)  # 0: plain NPO, at twice the cost

    @property
    def passes_per_loss(self) -> int:
        return 2  # the gradient at theta, then the loss at the ascent point

    def ascent(self, model: torch.nn.Module, forget) -> dict[int, torch.Tensor]:
        """rho * g / ||g||, per trained parameter (empty when g is zero or not finite: no direction to climb)."""
        params = _trained(model)
        with torch.enable_grad():
            loss = self.forget_loss(model, forget)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        pairs = [(p, g.detach()) for p, g in zip(params, grads, strict=True) if g is not None]
        if not pairs:
            return {}
        # One host sync for the whole norm, not one per parameter.
        device = pairs[0][1].device
        norm = float(torch.linalg.vector_norm(torch.stack([g.float().norm().to(device) for _, g in pairs])))
        if not math.isfinite(norm) or norm == 0.0:
            return {}
        scale = self.settings.rho / norm
        return {id(p): g * scale for p, g in pairs}

    def __call__(self, model, forget, retain):
        s = self.settings
        with shifted_weights(model, self.ascent(model, forget)):
            forget_loss = self.forget_loss(model, forget)
        return Loss({"forget": s.gamma * forget_loss, "retain": s.alpha * mean_token_nll(model, retain)})


@METHODS.register("rs-npo", "rsnpo")
class RSNPO(NPO):
    """NPO with its forget term averaged over Gaussian weight noise (Unlearn-Smooth's NPO+RS).

    L = gamma * (1/K) sum_k L_f(theta + delta_k) + alpha * NLL(retain), delta_k ~ N(0, sigma^2 I).

    The draws depend on (seed, step, k) only: every evaluation within a step sees the same K shifts (a
    zeroth-order difference compares the same smoothed loss) and a resumed run draws what it would have."""

    shifts_weights = True

    @dataclass(frozen=True)
    class Settings(NPO.Settings):
        sigma: float = setting(0.01, limit=NON_NEGATIVE)
        samples: int = setting(3, limit=AT_LEAST_ONE)
        seed: int = setting(0, limit=NON_NEGATIVE)

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.step = 0

    def begin_step(self, step: int) -> None:
        self.step = step

    @property
    def passes_per_loss(self) -> int:
        return self.settings.samples

    def noise(self, model: torch.nn.Module, sample: int) -> dict[int, torch.Tensor]:
        """Draw `sample` of this step: sigma * N(0, I) per trained parameter, from a generator on its device."""
        s = self.settings
        shifts = {}
        for index, p in enumerate(_trained(model)):
            gen = torch.Generator(device=p.device).manual_seed(mix(s.seed, self.step, sample, index))
            shifts[id(p)] = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).mul_(s.sigma)
        return shifts

    def __call__(self, model, forget, retain):
        s = self.settings
        total = None
        for sample in range(s.samples):
            with shifted_weights(model, self.noise(model, sample)):
                value = self.forget_loss(model, forget)
            total = value if total is None else total + value
        assert total is not None  # samples >= 1
        return Loss({"forget": s.gamma * total / s.samples, "retain": s.alpha * mean_token_nll(model, retain)})
