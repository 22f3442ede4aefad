"""Updates to bf16 weights that are right in expectation: stochastic rounding (the `lean` precision).

Rounded to nearest, an update smaller than half a bf16 step of the weight it is added to is lost every time
(bf16 keeps 8 significant bits: a weight of 0.05 has a step of 2.4e-4, an lr-sized update is 1e-5 .. 1e-4).
Stochastic rounding keeps it on average: x, computed in fp32, becomes the bf16 value above it with probability
(x − below) / (above − below) and the one below otherwise, so E[stored] = x and many small updates add up to
what they would in fp32 (Gupta et al., 2015; the bf16 form used by torchao's optimizers). In bits: add a uniform
random 16-bit integer to the fp32 pattern and cut the low 16 bits. For a negative x the pattern's magnitude is
rounded the same way, which is again unbiased.

``LeanStep`` runs a library optimizer (AdamW, SGD, the sign grades, Muon) on bf16 weights a batch of parameters
at a time: those parameters, their gradients and their state are widened to fp32 for their update, and the results
are stochastically rounded back to bf16. The fp32 copies exist for one batch at a time (at most 1 GiB, or one
parameter), so the memory is that of bf16 weights, gradients and state (8 bytes a weight with AdamW, against 16 for
fp32 master weights).

The rounding noise is drawn from a generator seeded by (seed, step, parameter): a run is reproducible on one
device and a resumed run draws the same noise, without any generator state to checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from unlearn.compute.placement import Placement
from unlearn.optim.zo_directions import mix

_LOW = 1 << 16
_MASK = -_LOW  # 0xFFFF0000 as a signed 32-bit integer


def noise_generator(device: torch.device, seed: int, step: int, index: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix(seed, step, index))


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> None:
    """``target`` (bf16) ← ``value`` (any float dtype) stochastically rounded; exact where ``value`` is."""
    wide = value.detach().to(torch.float32).contiguous()
    noise = torch.randint(0, _LOW, wide.shape, dtype=torch.int32, device=wide.device, generator=generator)
    bits = wide.view(torch.int32).add_(noise).bitwise_and_(_MASK)
    target.copy_(bits.view(torch.float32))  # the low 16 bits are zero: the cast to bf16 is exact


BATCH_BYTES = 1 << 30  # fp32 copies held at once: a weight, its gradient and two moments, 16 bytes an element


class LeanStep:
    """Steps a library optimizer on bf16 parameters through fp32, a batch of parameters at a time (module
    docstring): as many as fit BATCH_BYTES of fp32 copies, at least one, so a GPU's foreach kernels still see many
    tensors per launch while the copies stay far smaller than the model.

    Parameters in another dtype (fp32 LoRA adapters beside a bf16 base, say) are stepped as they are."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, optimizer: torch.optim.Optimizer, library_step: Callable[[], Any]) -> None:
        groups = optimizer.param_groups
        # The step count lives in the first param group, which the optimizer's state_dict saves: a run resumed from
        # a checkpoint draws the same rounding noise as one that was never interrupted.
        step = int(groups[0].get("rounding_step", 0))
        held = [group["params"] for group in groups]
        try:
            for group in groups:  # every other parameter first, as the library would
                group["params"] = [p for p in group["params"] if p.grad is not None and p.dtype != torch.bfloat16]
            if any(group["params"] for group in groups):
                library_step()
            index = 0
            for k, params in enumerate(held):
                batch: list[torch.Tensor] = []
                size = 0
                for p in params:
                    if p.grad is None or p.dtype != torch.bfloat16:
                        continue
                    if batch and (size + p.numel()) * 16 > BATCH_BYTES:
                        self._batch(optimizer, k, batch, library_step, step, index)
                        index, batch, size = index + len(batch), [], 0
                    batch.append(p)
                    size += p.numel()
                if batch:
                    self._batch(optimizer, k, batch, library_step, step, index)
                    index += len(batch)
        finally:
            for group, params in zip(groups, held, strict=True):
                group["params"] = params
        groups[0]["rounding_step"] = step + 1

    def _batch(self, optimizer: torch.optim.Optimizer, group_index: int, batch: list[torch.Tensor],
               library_step: Callable[[], Any], step: int, first: int) -> None:
        """One library step over ``batch`` (parameters of param group ``group_index``) widened to fp32, then every
        value it wrote stochastically rounded back into bf16; noise seeded per parameter (its running index)."""
        stored = [(p.data, p.grad) for p in batch]
        for j, group in enumerate(optimizer.param_groups):
            group["params"] = list(batch) if j == group_index else []
        for p in batch:
            state = _state_of(optimizer, p)
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 and value.shape == p.shape:
                    state[key] = value.float()
            p.data = p.data.float()
            p.grad = p.grad.float()  # type: ignore[union-attr]
        try:
            library_step()
            for offset, (p, (data, _)) in enumerate(zip(batch, stored, strict=True)):
                index = first + offset
                stochastic_round_(data, p.data, noise_generator(data.device, self.seed, step, 2 * index))
                state = _state_of(optimizer, p)
                gen = noise_generator(data.device, self.seed, step, 2 * index + 1)
                for key, value in list(state.items()):
                    # The moments are stored in bf16 too, stochastically rounded: rounded to nearest, Adam's second
                    # moment (v += 0.001·(g² − v)) would stop moving.
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == p.shape:
                        low = torch.empty_like(value, dtype=torch.bfloat16)
                        stochastic_round_(low, value, gen)
                        state[key] = low
        finally:
            for p, (data, grad) in zip(batch, stored, strict=True):
                p.grad = None
                p.data = data
                p.grad = grad


def _state_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[Any, Any]:
    """The state of ``p``: in ``optimizer.state``, or in the sub-optimizer that holds it (Muon's parts)."""
    for owner in [optimizer, *getattr(optimizer, "parts", {}).values()]:
        if p in owner.state:
            return owner.state[p]
    return {}


def use_precision(optimizer: torch.optim.Optimizer, placement: Placement, seed: int,
                  model: torch.nn.Module | None = None) -> None:
    """What the placement's precision asks of an optimizer that trains a model: under `lean`, stochastically
    rounded updates (``round_updates``) and, for zeroth-order probing, probes on transient copies of ``model``'s
    weights (``probe_without_writing``); nothing otherwise. A ValueError where the optimizer cannot."""
    if not placement.stochastic:
        return
    round_updates = getattr(optimizer, "round_updates", None)
    if not callable(round_updates):
        raise ValueError(f"optimizer {type(optimizer).__name__} cannot round its updates stochastically")
    round_updates(seed)
    probe = getattr(optimizer, "probe_without_writing", None)
    if model is not None and callable(probe):
        probe(model)
