"""Zeroth-order grade: MeZO-style two-sided SPSA, gradient-free and without per-parameter state.

Per query j a seed s_j is drawn; the direction d_j = μ·z_j (z_j ~ N(0, I), rounded to 8 significant
bits) is never stored but regenerated bit-identically from s_j, one generator reseeded per parameter so
the order of passes cannot change it. The step evaluates L(θ ± d_j), forms g_j = (L+ − L−) / 2μ, moves
θ −= lr·(g_j / q)·d_j / μ for every j, then θ −= lr·wd·θ. Each query costs 2 forwards and 5 in-place
passes over the parameters (probe, undo, probe, undo; the last undo is folded into the update, so
one pass less per step); peak memory is that of inference.

Restoring θ after a probe — what is exact, and what cannot be:
* In place, θ ← fl(θ + d) is undone by θ ← fl(θ − d) with the same d, and d is coarse (8 bits), so θ + d
  is exact whenever d's last bit is no finer than ulp(θ). Measured share of float32 elements not restored
  bit-exactly, μ = 1e-3 (MeZO's θ + μz − 2μz + μz with fused adds in brackets): N(0, 0.02²) weights
  8.4 % (46 %), ones as in norm weights 0.25 % (31 %), zeros as in LoRA B 0 % (100 %). Every miss is
  within 1 ulp of |θ| + |d|.
* No memoryless scheme reaches 0 % in general: θ ↦ fl(θ + d) is not injective (every |θ| < ulp(d)/2
  lands on d; stepping into a coarser binade drops θ's last bit), so nothing computed in place from the
  perturbed value can recover θ. This is a counting argument, not an implementation gap.
* ``exact_restore=True`` keeps a copy of the trainable parameters for the duration of one step (freed
  before ``step`` returns; ``self.state`` stays empty) and restores by copying: bit-exact, for one extra
  copy of the *trainable* parameters — negligible for LoRA, 2x parameter memory for full fine-tuning,
  hence off by default.

The closure must be deterministic (model in eval mode, no dropout): L+ and L− must differ only by θ.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from unlearn.optim.protocol import Closure, register, require_closure

_SEED_RANGE = 2**62  # leaves room for the per-parameter offset below 2**63


_CHUNK = 1 << 21  # elements per independently seeded block of z
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))
    return _POOL


def _fill_normal(out: torch.Tensor, seed: int) -> None:
    out.normal_(generator=torch.Generator(device=out.device).manual_seed(seed))


def _direction(
    p: torch.Tensor, seed: int, mu: float, gens: dict[torch.device, torch.Generator]
) -> torch.Tensor:
    """d = μ·z for one parameter, rounded to 8 significant bits; identical on every call with ``seed``.

    A coarse d keeps θ + d exact whenever d's last bit is no finer than ulp(θ), so the round trip only
    loses θ's bits where it must (see the module docstring). The update moves along the same d / μ, so
    the estimator's direction is exactly the one that was probed.

    z is drawn directly in bfloat16 (~3x faster than float32 on CPU, and already the 8-bit mantissa we
    want; bfloat16 keeps float32's exponent range). On CPU the random draw, not the forwards, dominates
    a ZO step of a small model, and torch's generator is single-threaded: large tensors are therefore
    drawn as fixed-size blocks, each seeded from (seed, block), on a thread pool. The block layout does
    not depend on the thread count, so z is the same on every machine.
    """
    z = torch.empty(p.shape, device=p.device, dtype=torch.bfloat16)
    flat = z.view(-1)
    if p.device.type != "cpu" or flat.numel() <= _CHUNK:
        gen = gens.get(p.device)
        if gen is None:  # generators are device-bound; one per device is reused and reseeded
            gen = gens[p.device] = torch.Generator(device=p.device)
        gen.manual_seed(seed)
        flat.normal_(generator=gen)
    else:
        blocks = flat.split(_CHUNK)
        block_seeds = [(seed + (b + 1) * 0x9E3779B97F4A7C15) % (1 << 63) for b in range(len(blocks))]
        list(_pool().map(_fill_normal, blocks, block_seeds))
    return z.mul_(mu).to(p.dtype)


def _shift(
    params: list[torch.Tensor],
    seed: int,
    mu: float,
    scales: list[float],
    gens: dict[torch.device, torch.Generator],
) -> None:
    """θ_i += scales[i]·d_i in place (scale ±1 for a probe, −lr·g/μ for the update)."""
    for i, (p, scale) in enumerate(zip(params, scales, strict=True)):
        if scale != 0.0:
            p.add_(_direction(p, seed + i, mu, gens), alpha=scale)


def _probe(
    params: list[torch.Tensor],
    closure: Closure,
    seed: int,
    mu: float,
    gens: dict[torch.device, torch.Generator],
    snapshot: list[torch.Tensor] | None,
    restore: bool = True,
) -> tuple[float, float]:
    """(L(θ + d), L(θ − d)), leaving θ restored (see the module docstring for how exactly), or left at
    θ − d when ``restore`` is False: the caller then folds the undo into its update pass."""
    losses = []
    for sign in (1.0, -1.0):
        _shift(params, seed, mu, [sign] * len(params), gens)
        losses.append(float(closure()))
        if snapshot is not None:
            for p, saved in zip(params, snapshot, strict=True):
                p.copy_(saved)
        elif restore or sign > 0:
            # Undo with the inverse of the same op: fl(fl(θ + d) − d) is θ far more often than MeZO's
            # θ + μz − 2μz + μz, which compounds three roundings.
            _shift(params, seed, mu, [-sign] * len(params), gens)
    return losses[0], losses[1]


def _draw(rng: torch.Generator) -> int:
    return int(torch.randint(0, _SEED_RANGE, (1,), generator=rng))


@register("zo")
class ZerothOrder(torch.optim.Optimizer):
    grade = "zeroth-order"

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-5,
        mu: float = 1e-3,
        q: int = 1,
        weight_decay: float = 0.0,
        seed: int = 0,
        exact_restore: bool = False,
    ) -> None:
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}")
        if mu <= 0:
            raise ValueError(f"mu must be > 0, got {mu}")
        if not isinstance(q, int) or q < 1:
            raise ValueError(f"q must be an integer >= 1, got {q!r}")
        # lr and weight_decay live in param_groups so LR schedulers and per-group settings work as usual;
        # mu, q and the seed are properties of the estimator as a whole.
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.mu, self.q, self.exact_restore = mu, q, exact_restore
        self._rng = torch.Generator().manual_seed(seed)
        self._gens: dict[torch.device, torch.Generator] = {}

    @property
    def forwards_per_step(self) -> int:
        return 2 * self.q

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        closure = require_closure(closure)
        params = [p for group in self.param_groups for p in group["params"]]
        lrs = [group["lr"] for group in self.param_groups for _ in group["params"]]
        snapshot = [p.detach().clone() for p in params] if self.exact_restore else None
        seeds = [_draw(self._rng) for _ in range(self.q)]
        coeffs, losses = [], []
        # Without a snapshot the last query's undo (θ += d) is folded into the update along the same d:
        # one pass over the parameters (and one draw of z) fewer per step. With lr = 0 the folded scale
        # is exactly 1, i.e. the same undo, so restoring is unchanged.
        deferred = snapshot is None
        for j, seed in enumerate(seeds):
            last = j == len(seeds) - 1
            plus, minus = _probe(params, closure, seed, self.mu, self._gens, snapshot,
                                 restore=not (last and deferred))
            coeffs.append((plus - minus) / (2 * self.mu) / self.q)
            losses += [plus, minus]
        del snapshot  # the copy lives only while θ is perturbed
        # The update waits until every query is evaluated so all of them probe the same θ.
        for j, (seed, g) in enumerate(zip(seeds, coeffs, strict=True)):
            undo = 1.0 if deferred and j == len(seeds) - 1 else 0.0
            _shift(params, seed, self.mu, [undo - lr * g / self.mu for lr in lrs], self._gens)
        for group in self.param_groups:
            if group["weight_decay"] and group["lr"]:
                for p in group["params"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
        return torch.tensor(sum(losses) / len(losses), dtype=torch.float32)

    # The seed stream is the only state; checkpoint it so a resumed run draws the same directions.
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["zo_rng"] = self._rng.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("zo_rng", None)
        super().load_state_dict(state_dict)
        if rng is not None:
            self._rng.set_state(rng)


def estimate_gradient(
    params: Iterable[torch.Tensor], closure: Closure, *, mu: float = 1e-3, queries: int = 1, seed: int = 0
) -> list[torch.Tensor]:
    """The averaged SPSA estimate mean_j g_j·z_j, materialized — for tests and diagnostics only.

    It uses the same probing code as ``ZerothOrder.step``, which never builds this tensor.
    """
    params = list(params)
    rng, gens = torch.Generator().manual_seed(seed), {}
    estimate = [torch.zeros_like(p) for p in params]
    with torch.no_grad():
        for _ in range(queries):
            s = _draw(rng)
            plus, minus = _probe(params, closure, s, mu, gens, None)
            g = (plus - minus) / (2 * mu) / queries
            for i, (p, e) in enumerate(zip(params, estimate, strict=True)):
                e.add_(_direction(p, s + i, mu, gens), alpha=g / mu)
    return estimate
