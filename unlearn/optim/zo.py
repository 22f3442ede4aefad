"""Zeroth-order grade: gradient-free SPSA-type estimators that probe the loss at perturbed weights.

One engine (``ZerothOrderBase``) does what every member shares: draw seeds, perturb θ in place along
d_j = μ·z_j regenerated chunk by chunk (``zo_directions``), evaluate the closure without autograd, put θ
back, then update from the seeds and the scalar losses. Members differ only in the coefficients they
form from the losses and in the update rule:

==============  =================================================================  ================
name            estimate / update                                                  forwards / step
==============  =================================================================  ================
zo              ZO-SGD: ĝ = Σ_j c_j z_j, θ −= lr·ĝ (``momentum`` β: m = βm + ĝ)    2q (one-sided q+1)
zo-sign         θ −= lr·sign(ĝ)                                                    2q
zo-adam         Adam moments on ĝ                                                  2q
fzoo            q one-sided Rademacher probes; c_j = (L_j − L_0) / (q·σ), σ = std(L_j)  q + 1
zo-rank         only the ranks of the 2q mirrored probe losses: c_j = (u+ − u−)/q         2q
hizoo           probes along H^{-1/2} z; diagonal Hessian H from L+ + L− − 2L_0      2q + 1
zo-lowrank      d = U Z Vᵀ for matrices (U, V lazily refreshed)                    2q
zo-muon         d = P Z in a rank-r subspace; Newton–Schulz-orthogonalized step    2q
==============  =================================================================  ================

c_j = (L(θ + d_j) − L(θ − d_j)) / (2μq) two-sided, (L(θ + d_j) − L(θ)) / (μq) one-sided.

Restoring θ after a probe — what is exact, and what cannot be:
* In place, the probes go θ → fl(θ + d) → fl(· − 2d) → fl(· + d), and d is coarse (μz rounded to 8
  significant bits, so 2d is exact too): each add is exact whenever d's last bit is no finer than the
  ulp of the result. Measured share of float32 elements not restored bit-exactly (lr = 0, μ = 1e-3):
  N(0, 0.02²) weights 8.3 %, ones as in norm weights 0.33 %, zeros as in LoRA B 0 %; MeZO's
  full-precision μz gives 46 %, 31 % and 100 %. Every miss is within 1 ulp of |θ| + |d|.
* No memoryless scheme reaches 0 % in general: θ ↦ fl(θ + d) is not injective (every |θ| < ulp(d)/2
  lands on d), so nothing computed in place from the perturbed value can recover θ.
* ``exact_restore=True`` keeps a copy of the trainable parameters for the duration of one step (freed
  before ``step`` returns) and restores by copying: bit-exact, for one copy of the *trainable* parameters —
  negligible for LoRA, 2x parameter memory for full fine-tuning, hence off by default.
* ``probe_without_writing(model)`` probes on transient copies (forward hooks swap each module's probed weights
  for θ ± d while it runs): nothing to restore, for one module's weights of memory. In bf16, where an in-place
  probe rounded to nearest misses far more often than in fp32 (and the misses add up over steps), the `lean`
  precision uses it. In fp32 it takes the same steps as ``exact_restore``, bit for bit.

Cost per two-sided query: 2 forwards and 3 passes over the parameters (θ + d, straight to θ − d, and the
last undo folded into the update pass).
The closure must be deterministic (model in eval mode): L+ and L− must differ only by θ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from unlearn.core.errors import UserError
from unlearn.core.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT_OPEN, Limit, setting
from unlearn.optim.protocol import (
    OPTIMIZERS,
    Closure,
    ModelDependent,
    compile_pattern,
    evaluate,
    evaluate_parts,
    read_settings,
    require_closure,
)
from unlearn.optim.rounding import noise_generator, stochastic_round_
from unlearn.optim.zo_directions import (
    KINDS,
    Directions,
    IIDDirections,
    LowRankDirections,
    ParameterDirections,
    PoolDirections,
    SubspaceDirections,
)
from unlearn.optim.zo_stable import Coefficients, Stabilizers

_SEED_RANGE = 2**62
FLAT_STEPS = 5  # consecutive steps of probes that all saw the same loss before a member stops (_check_visible)


def _draw(rng: torch.Generator) -> int:
    return int(torch.randint(0, _SEED_RANGE, (1,), generator=rng))


@dataclass
class ZOSettings(Stabilizers):
    """What every zeroth-order member takes: the probe (scale ``mu``, ``q`` probes a step), the step, the seed of
    its directions, and the stabilizers of ``zo_stable`` (clip, normalize, warmup, schedule, rollback, include)."""

    lr: float = setting(1e-5, limit=NON_NEGATIVE)
    mu: float = setting(1e-3, limit=POSITIVE)
    q: int = setting(1, limit=AT_LEAST_ONE)
    weight_decay: float = setting(0.0, limit=NON_NEGATIVE)
    seed: int = 0
    exact_restore: bool = False


@dataclass
class ProbeSettings(ZOSettings):
    """Members that probe along plain directions of a chosen kind, one- or two-sided."""

    direction: str = setting("gaussian", limit=Limit(choices=KINDS))
    sided: int = setting(2, limit=Limit(choices=(1, 2)))


class ZerothOrderBase(torch.optim.Optimizer):
    """The shared engine; subclasses set ``sided``/``needs_center`` and override ``coefficients``,
    ``make_directions`` or ``apply_update``. lr and weight_decay live in param_groups (schedulers work).
    Every member's ``Settings`` extends ``ZOSettings``, so each takes the stabilizers of ``zo_stable``."""

    grade = "zeroth-order"
    uses_gradients = False  # the closure is only evaluated: no backward pass, no gradient memory
    linear_update = True  # θ −= lr·ĝ: applied seed by seed, no buffer; False: built chunk by chunk
    Settings: type[ZOSettings] = ZOSettings

    def __init__(self, params: Iterable[Any], settings: ZOSettings, *, direction: str, sided: int,
                 **defaults: Any) -> None:
        s = settings
        lr, weight_decay, mu, q, seed, exact_restore = s.lr, s.weight_decay, s.mu, s.q, s.seed, s.exact_restore
        self.stable = s
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, **defaults})
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])  # the schedule's base; group["lr"] is the current one
        self.mu, self.q, self.direction_kind, self.sided = mu, q, direction, sided
        self.exact_restore, self.seed = exact_restore, seed
        self._rng = torch.Generator().manual_seed(seed)
        self.params, self._groups = self._selected(self.stable.include_patterns)
        self._coeffs = Coefficients(self.stable)
        self._rolled_back = 0.0
        self._watched: list[float] = []  # the rollback's part at each evaluation of the current step
        # Which part that is: rollback_on's first that the loss has, found at the first evaluation (the total
        # without a rollback: then nothing is watched and the plain evaluation is the cheaper one).
        first = self.stable.rollback_parts[0]
        self._watch: str | None = "total" if self.stable.rollback is None or first == "total" else None
        for p in self.params:
            if not p.is_contiguous():  # chunks are views of p.view(-1)
                raise ValueError("zeroth-order optimizers need contiguous parameters")
        if self.stable.draw != "pool" and type(self).make_directions is not ZerothOrderBase.make_directions:
            raise ValueError(f"draw '{self.stable.draw}' is for plain Gaussian or Rademacher probes; this member "
                             f"draws its own structured directions")
        self.directions: Directions = self.make_directions()
        self.steps_taken = 0
        self._check_probe_scale()  # before any training: a member whose probes round away can learn nothing
        self._round_seed: int | None = None  # set by round_updates: bf16 weights take stochastically rounded updates
        # Set by probe_without_writing: (module, [(parameter name, index in self.params)]) whose forwards see the
        # probe on a transient copy, and the probe currently applied (seed, ±1), if any.
        self._hooked: list[tuple[torch.nn.Module, list[tuple[str, int]]]] = []
        self._stacks: list[list[list[tuple[torch.Tensor, torch.Tensor]]]] = []  # per hooked module: swapped weights
        self._active: tuple[int, float] | None = None
        self._flat_steps = 0  # consecutive steps whose probes all saw exactly the same loss

    def _selected(self, include: list[str] | None) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """The parameters this member probes and updates: all, or those whose name matches the first pattern
        of ``include`` that matches any, each with its param group."""
        pairs = [(p, group, names[k] if names is not None else None)
                 for group in self.param_groups for names in [group.get("param_names")]
                 for k, p in enumerate(group["params"])]
        if include is None:
            return [p for p, _, _ in pairs], [g for _, g, _ in pairs]
        if any(name is None for _, _, name in pairs):
            raise ValueError("include selects parameters by name: give the optimizer named parameters")
        for compiled in [compile_pattern("include", pattern) for pattern in include]:  # all checked up front
            chosen = [(p, g) for p, g, name in pairs if compiled.search(name)]
            if chosen:
                return [p for p, _ in chosen], [g for _, g in chosen]
        shown = include[0] if len(include) == 1 else include
        raise ModelDependent(f"include {shown!r} selects no trainable parameter (names look like "
                             f"{pairs[0][2]!r}); set it to match this model's parameter names")

    # ---- hooks -------------------------------------------------------------------------------------
    def make_directions(self) -> Directions:
        if self.stable.draw == "parameter":
            return ParameterDirections(self.params, self.mu, self.direction_kind)
        return PoolDirections(self.params, self.mu, self.direction_kind)

    @property
    def needs_center(self) -> bool:
        return self.sided == 1

    @property
    def forwards_per_step(self) -> int:
        return self.sided * self.q + int(self.needs_center)

    def coefficients(self, center: float | None, plus: list[float], minus: list[float]) -> list[float]:
        """c_j such that the gradient estimate is ĝ = Σ_j c_j z_j."""
        if self.sided == 2:
            return [(p - m) / (2 * self.mu * self.q) for p, m in zip(plus, minus, strict=True)]
        assert center is not None
        return [(p - center) / (self.mu * self.q) for p in plus]

    def apply_update(self, index: int, k: int, p: torch.Tensor, a: int, b: int, chunk: torch.Tensor,
                     estimate: torch.Tensor, lr: float) -> None:
        """Non-linear rules: update ``chunk`` k (= θ[a:b]) of parameter ``index`` from ``estimate`` (= ĝ[a:b])."""
        raise NotImplementedError

    # ---- engine ------------------------------------------------------------------------------------
    def _evaluate(self, closure: Closure) -> float:
        """The loss over the whole batch (no autograd); the part the rollback watches is kept aside. Only a
        rollback on a named part pays for the part-by-part sums (one collective per part under a launcher)."""
        if self._watch == "total":
            total = evaluate(closure)
            self._watched.append(total)
            return total
        parts = evaluate_parts(closure)
        if self._watch is None:  # the first of rollback_on's parts this loss has, fixed from the first step on
            wanted = self.stable.rollback_parts
            self._watch = next((part for part in wanted if part in parts), None)
            if self._watch is None:
                raise ValueError(f"rollback_on {(wanted[0] if len(wanted) == 1 else wanted)!r}: the loss has no "
                                 f"such part (its parts: {', '.join(sorted(parts))})")
        self._watched.append(parts[self._watch])
        return parts["total"]

    def shift(self, seed: int, scales: list[float]) -> None:
        """θ_i += scales[i]·d_i(seed) in place, chunk by chunk. When the directions are views of a drawn pool
        (no new memory per chunk), the chunks are grouped by their multiplier and each group is one
        ``torch._foreach_add_``: a handful of fused launches per pass on a GPU instead of one per chunk (tens of
        thousands at 7B), with the same arithmetic as ``add_``."""
        fused = getattr(self.directions, "views", False)
        groups: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for i, (p, scale) in enumerate(zip(self.params, scales, strict=True)):
            if scale == 0.0:
                continue
            flat = p.detach().view(-1)
            for k, (a, b) in enumerate(self.directions.chunks[i]):
                d, m = self.directions.direction(seed, i, k)
                if not fused:
                    flat[a:b].add_(d, alpha=m * scale)
                    continue
                targets, sources = groups.setdefault(m * scale, ([], []))
                targets.append(flat[a:b])
                sources.append(d)
        for alpha, (targets, sources) in groups.items():
            torch._foreach_add_(targets, sources, alpha=alpha)

    def _restore(self, seed: int, sign: float, snapshot: list[torch.Tensor] | None) -> None:
        if snapshot is None:
            self.shift(seed, [-sign] * len(self.params))  # the inverse of the same op (see docstring)
        else:
            for p, saved in zip(self.params, snapshot, strict=True):
                p.detach().copy_(saved)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        closure = require_closure(closure)
        factor = self.stable.lr_factor(self.steps_taken)
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * factor
        rollback = self.stable.rollback is not None
        transient = bool(self._hooked)  # probes on transient copies: nothing to restore
        # A copy of θ (and, for rollback, of the member's buffers) for the duration of this step only.
        snapshot = [p.detach().clone() for p in self.params] \
            if (self.exact_restore and not transient) or rollback else None
        buffers = {id(p): {k: v.clone() for k, v in self.state[p].items() if isinstance(v, torch.Tensor)}
                   for p in self.params} if rollback else None
        seeds = [_draw(self._rng) for _ in range(self.q)]
        self.directions.prepare(seeds, self.steps_taken)
        self._watched = []
        center = self._evaluate(closure) if self.needs_center else None
        plus: list[float] = []
        minus: list[float] = []
        pending: tuple[int, float] | None = None  # a probe left in place, undone inside the update pass
        for j, seed in enumerate(seeds):
            if transient:
                try:
                    self._active = (seed, 1.0)
                    plus.append(self._evaluate(closure))
                    if self.sided == 2:
                        self._active = (seed, -1.0)
                        minus.append(self._evaluate(closure))
                finally:
                    self._active = None
                    self._put_stored_back()  # a forward that raised midway never ran its modules' after-hooks
                continue
            self.shift(seed, [1.0] * len(self.params))
            plus.append(self._evaluate(closure))
            offset = 1.0  # θ currently sits at θ + offset·d
            if self.sided == 2:  # straight from θ + d to θ − d: one pass instead of undo + probe
                if snapshot is not None:
                    self._restore(seed, offset, snapshot)
                self.shift(seed, [-1.0 if snapshot is not None else -2.0] * len(self.params))
                minus.append(self._evaluate(closure))
                offset = -1.0
            if j == len(seeds) - 1 and snapshot is None:
                pending = (seed, offset)  # folded into the update: one pass fewer per step
            else:
                self._restore(seed, offset, snapshot)
        self._check_visible(center, plus, minus)
        coeffs = self._coeffs(self.coefficients(center, plus, minus))
        self.update(seeds, coeffs, pending)
        for p, group in zip(self.params, self._groups, strict=True):
            if group["weight_decay"] and group["lr"] and not self._rounded(p):  # rounded ones: in the update
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
        self.steps_taken += 1
        losses = plus + minus + ([center] if center is not None else [])
        watched = self._watched  # the watched part at every probe, the centre (if any) first
        before = watched[0] if center is not None else sum(watched) / len(watched)
        self._rolled_back = 0.0
        threshold = self.stable.rollback
        if threshold is not None and snapshot is not None and buffers is not None:  # all three, or none
            self._evaluate(closure)  # the one extra forward, on the same batch
            after = self._watched[-1]
            if not math.isfinite(after) or after - before > threshold:
                self._put_back(snapshot, buffers)
                self._rolled_back = 1.0
        del snapshot, buffers  # the copy lives only for the step
        return torch.tensor(sum(losses) / len(losses), dtype=torch.float32)

    def _put_back(self, snapshot: list[torch.Tensor], buffers: dict[int, dict[str, torch.Tensor]]) -> None:
        """Undo this step's update bit-exactly: θ and every buffer the update touched, copied back."""
        for p, saved in zip(self.params, snapshot, strict=True):
            p.detach().copy_(saved)
            state = self.state[p]
            for key in [k for k, v in state.items() if isinstance(v, torch.Tensor)]:
                if key in buffers[id(p)]:
                    state[key].copy_(buffers[id(p)][key])
                else:
                    del state[key]  # created by this step

    @property
    def forwards_with_checks(self) -> int:
        """Forwards per step including the rollback check."""
        return self.forwards_per_step + int(self.stable.rollback is not None)

    def diagnostics(self) -> dict[str, float]:
        """Per step, for log.jsonl: forwards spent, coefficients clipped, whether the step was rolled back, and
        the learning-rate multiplier of the warm-up/schedule."""
        return {"forwards": float(self.forwards_with_checks), "clipped": float(self._coeffs.clipped),
                "rolled_back": self._rolled_back, "lr_factor": self.stable.lr_factor(max(self.steps_taken - 1, 0))}

    def _lrs(self) -> list[float]:
        return [group["lr"] for group in self._groups]

    def probe_without_writing(self, model: torch.nn.Module) -> None:
        """Probe on transient copies: while a module of ``model`` runs, its probed weights are replaced by θ ± d
        computed into a new tensor, and put back (the same tensor object) when it returns. The weights themselves
        are only ever written by the update, so restoring is exact in any precision, at the cost of one module's
        weights of extra memory at a time. Used for bf16 weights (`lean`), where probing in place, rounded to
        nearest, leaves a drift that adds up over steps (``python -m unlearn.perf.zo_drift``)."""
        owner = {id(p): i for i, p in enumerate(self.params)}
        for module in model.modules():
            mine = [(name, owner[id(p)]) for name, p in module.named_parameters(recurse=False) if id(p) in owner]
            if not mine:
                continue
            stack: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
            self._stacks.append(stack)

            def before(mod: torch.nn.Module, args: Any, mine=mine, stack=stack) -> None:
                if self._active is None:
                    return
                seed, scale = self._active
                swapped = []
                for name, index in mine:
                    p = mod._parameters[name]
                    assert p is not None
                    swapped.append((p, p.data))
                    p.data = self._probed(index, p, seed, scale)
                stack.append(swapped)

            def after(mod: torch.nn.Module, args: Any, output: Any, stack=stack) -> None:
                if self._active is None or not stack:
                    return
                for p, stored in stack.pop():
                    p.data = stored

            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)
            self._hooked.append((module, mine))
        missing = set(range(len(self.params))) - {i for _, mine in self._hooked for _, i in mine}
        if missing:
            raise ValueError(f"{len(missing)} probed parameter(s) belong to no module of the model")

    def _check_probe_scale(self) -> None:
        """Refuse probes that mostly round away (when the member is built, from the weights as they are then):
        θ ± μz is stored in the weights' dtype, and where μ|z| is below
        half a step of that dtype at θ the probe leaves θ as it was. For bf16 weights near 1 (the norms) a step is
        0.0078, so μ = 1e-3 moves almost none of them. Estimated on a sample of each low-precision parameter: the
        share of probed weights a probe moves (Gaussian z: P(|z| > step/2μ); ±1 entries: whether μ > step/2)."""
        visible, total = 0.0, 0
        for p in self.params:
            if p.dtype not in (torch.bfloat16, torch.float16):
                visible, total = visible + p.numel(), total + p.numel()
                continue
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float()
            _, exponent = torch.frexp(sample)
            step = torch.ldexp(torch.full_like(sample, torch.finfo(p.dtype).eps), exponent - 1)  # one ulp at θ
            ratio = step / (2 * self.mu)
            if self.direction_kind == "rademacher":
                moved = (ratio < 1).float()
            else:
                moved = torch.special.erfc(ratio / math.sqrt(2))
            visible += float(moved.mean()) * p.numel()
            total += p.numel()
        if total and visible / total < 0.5:
            raise UserError(f"a probe of mu {self.mu:g} moves only {visible / total:.0%} of the probed weights: the "
                            f"rest round back to themselves in their low precision; raise optimizer mu, or use "
                            f"--precision master (fp32 weights)")

    def _check_visible(self, center: float | None, plus: list[float], minus: list[float]) -> None:
        """Stop a member whose probes the model cannot see: when every probe of FLAT_STEPS steps in a row returned
        exactly the loss it was compared with, the estimate is zero and nothing can be learned. That is what a
        probe below the weights' precision does (μ = 1e-3 on bf16 weights near 1, whose bf16 step is 0.0078)."""
        others = minus if self.sided == 2 else [center] * len(plus)
        flat = all(a == b for a, b in zip(plus, others, strict=True))
        self._flat_steps = self._flat_steps + 1 if flat else 0
        if self._flat_steps >= FLAT_STEPS:
            kinds = sorted({str(p.dtype).removeprefix("torch.") for p in self.params})
            raise UserError(f"the last {FLAT_STEPS} zeroth-order steps found no loss difference between their "
                            f"probes (mu {self.mu:g} on {'/'.join(kinds)} weights): the probes are below the weights' "
                            f"precision; raise optimizer mu, or use --precision master (fp32 weights)")

    def _put_stored_back(self) -> None:
        for stack in self._stacks:
            while stack:
                for p, stored in stack.pop():
                    p.data = stored

    def _probed(self, index: int, p: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
        """θ + scale·d for parameter ``index``, in a new tensor of p's dtype: each element added in fp32 and
        rounded once (in-place ``add_`` computes in fp32 for a bf16 tensor), without an fp32 copy of p."""
        work = p.detach().clone()
        flat = work.view(-1)
        for k, (a, b) in enumerate(self.directions.chunks[index]):
            d, m = self.directions.direction(seed, index, k)
            flat[a:b].add_(d, alpha=m * scale)
        return work

    def moving_params(self) -> list[torch.Tensor]:
        return list(self.params)  # those `include` selects

    def round_updates(self, seed: int) -> None:
        """bf16 parameters take their updates (and weight decay) computed in fp32 and stochastically rounded
        (``unlearn.optim.rounding``), and the member's buffers are kept in fp32: rounded to nearest, an lr-sized
        update of a bf16 weight is lost. Probes in place stay rounded to nearest and leave a drift on bf16 weights
        (see the module docstring on restoring): ``probe_without_writing`` avoids it, and `lean` runs use it."""
        self._round_seed = seed

    def _rounded(self, p: torch.Tensor) -> bool:
        return self._round_seed is not None and p.dtype == torch.bfloat16

    def update(self, seeds: list[int], coeffs: list[float], pending: tuple[int, float] | None) -> None:
        lrs = self._lrs()
        if any(self._rounded(p) for p in self.params):
            self._rounded_update(seeds, coeffs, pending, lrs)
            return
        if self.linear_update:
            for seed, c in zip(seeds, coeffs, strict=True):
                undo = self.undo_scale(pending, seed)
                self.shift(seed, [undo - lr * c / self.mu for lr in lrs])
            return
        for i, p in enumerate(self.params):
            flat = p.detach().view(-1)
            for k, (a, b) in enumerate(self.directions.chunks[i]):
                chunk = flat[a:b]
                if pending is not None:
                    d, m = self.directions.direction(pending[0], i, k)
                    chunk.add_(d, alpha=-pending[1] * m)
                self.apply_update(i, k, p, a, b, chunk, self._estimate(seeds, coeffs, i, k), lrs[i])

    def _estimate(self, seeds: list[int], coeffs: list[float], index: int, chunk: int) -> torch.Tensor:
        """ĝ over chunk ``chunk`` of parameter ``index``: Σ_j c_j·z_j, with z_j = d_j·m_j/μ (a new tensor)."""
        estimate: torch.Tensor | None = None
        for seed, c in zip(seeds, coeffs, strict=True):
            d, m = self.directions.direction(seed, index, chunk)
            if estimate is None:
                estimate = d * (m * c / self.mu)
            else:
                estimate.add_(d, alpha=m * c / self.mu)
        assert estimate is not None
        return estimate

    def _rounded_update(self, seeds: list[int], coeffs: list[float], pending: tuple[int, float] | None,
                        lrs: list[float]) -> None:
        """The update chunk by chunk in fp32 (the pending probe undone, the step, weight decay), stored back into
        bf16 parameters by stochastic rounding; other parameters are updated in place as they are."""
        assert self._round_seed is not None
        for i, p in enumerate(self.params):
            flat = p.detach().view(-1)
            low = self._rounded(p)
            gen = noise_generator(p.device, self._round_seed, self.steps_taken, i) if low else None
            decay = self._groups[i]["weight_decay"] * lrs[i]
            for k, (a, b) in enumerate(self.directions.chunks[i]):
                chunk = flat[a:b]
                work = chunk.float() if low else chunk
                if pending is not None:
                    d, m = self.directions.direction(pending[0], i, k)
                    work.add_(d, alpha=-pending[1] * m)
                if self.linear_update:
                    for seed, c in zip(seeds, coeffs, strict=True):
                        d, m = self.directions.direction(seed, i, k)
                        work.add_(d, alpha=-lrs[i] * c * m / self.mu)
                else:
                    self.apply_update(i, k, p, a, b, work, self._estimate(seeds, coeffs, i, k), lrs[i])
                if gen is not None:
                    if decay:
                        work.mul_(1.0 - decay)
                    stochastic_round_(chunk, work, gen)

    # The seed stream and step count are the only non-tensor state; checkpoint them so a resumed run draws
    # the same directions.
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["zo_rng"] = self._rng.get_state()
        state["zo_steps"] = self.steps_taken
        state["zo_coefficients"] = self._coeffs.state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("zo_rng", None)
        self.steps_taken = state_dict.pop("zo_steps", 0)
        coefficients = state_dict.pop("zo_coefficients", None)
        if coefficients is not None:
            self._coeffs.load(coefficients)
        super().load_state_dict(state_dict)
        # torch replaces the group dicts on load: each probed parameter's group is looked up again.
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        self._groups = [group_of[id(p)] for p in self.params]
        if rng is not None:
            self._rng.set_state(rng)

    def _buffer(self, p: torch.Tensor, name: str, a: int, b: int, fill: float = 0.0) -> torch.Tensor:
        """Elements a:b of the flat state buffer ``name`` of ``p``, created (filled with ``fill``) on first use."""
        state = self.state[p]
        if name not in state:
            # fp32 beside bf16 weights whose updates are rounded stochastically: the buffers are the update's
            # precision, and an exponential average rounded to nearest in bf16 stops moving.
            dtype = torch.float32 if self._rounded(p) else p.dtype
            state[name] = torch.full_like(p, fill, dtype=dtype, memory_format=torch.contiguous_format)
        return state[name].view(-1)[a:b]

    @staticmethod
    def undo_scale(pending: tuple[int, float] | None, seed: int) -> float:
        """The shift that reverts the probe still in place when ``seed`` is the pending one, else 0."""
        return -pending[1] if pending is not None and pending[0] == seed else 0.0


@OPTIMIZERS.register("zo")
class ZerothOrder(ZerothOrderBase):
    """ZO-SGD (MeZO-style SPSA). ``momentum`` > 0 keeps one buffer: m = β·m + ĝ, θ −= lr·m."""

    @dataclass
    class Settings(ProbeSettings):
        momentum: float = setting(0.0, limit=UNIT_OPEN)

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        s = read_settings(type(self), options)
        self.momentum = s.momentum
        self.linear_update = s.momentum == 0.0  # stateless: no buffer, the update is one more shift
        super().__init__(params, s, direction=s.direction, sided=s.sided)

    def apply_update(self, index, k, p, a, b, chunk, estimate, lr):
        buf = self._buffer(p, "momentum", a, b)
        buf.mul_(self.momentum).add_(estimate)
        chunk.add_(buf, alpha=-lr)


@OPTIMIZERS.register("zo-sign")
class ZerothOrderSign(ZerothOrderBase):
    """ZO-signSGD: θ −= lr·sign(ĝ), i.e. every weight moves by exactly lr."""

    linear_update = False

    @dataclass
    class Settings(ProbeSettings):
        lr: float = setting(1e-6, limit=NON_NEGATIVE)

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        s = read_settings(type(self), options)
        super().__init__(params, s, direction=s.direction, sided=s.sided)

    def apply_update(self, index, k, p, a, b, chunk, estimate, lr):
        chunk.add_(estimate.sign_(), alpha=-lr)


@OPTIMIZERS.register("zo-adam")
class ZerothOrderAdam(ZerothOrderBase):
    """ZO-Adam: Adam's bias-corrected moments on the SPSA estimate (two buffers, as Adam)."""

    linear_update = False

    @dataclass
    class Settings(ProbeSettings):
        betas: tuple[float, float] = (0.9, 0.999)
        eps: float = 1e-8

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        s = read_settings(type(self), options)
        if not all(0 <= beta < 1 for beta in s.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {s.betas}")
        self.betas, self.eps = tuple(s.betas), s.eps
        super().__init__(params, s, direction=s.direction, sided=s.sided)

    def apply_update(self, index, k, p, a, b, chunk, estimate, lr):
        beta1, beta2 = self.betas
        t = self.steps_taken + 1
        m, v = self._buffer(p, "exp_avg", a, b), self._buffer(p, "exp_avg_sq", a, b)
        estimate = estimate.to(m.dtype)  # the directions are fp32; the buffers are the weights' dtype or fp32
        m.lerp_(estimate, 1 - beta1)
        v.mul_(beta2).addcmul_(estimate, estimate, value=1 - beta2)
        denom = (v / (1 - beta2**t)).sqrt_().add_(self.eps)
        chunk.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


@OPTIMIZERS.register("fzoo")
class FZOO(ZerothOrderBase):
    """FZOO: q one-sided Rademacher probes around L_0 = L(θ); the step is normalized by σ, the standard
    deviation of the q probe losses: θ −= lr·Σ_j (L_j − L_0)/(q·σ)·u_j. σ ≈ μ‖∇L‖, so the step is a
    normalized-gradient step whose size does not depend on μ or on the loss scale. A step whose probes
    all return the same loss (σ = 0) carries no information and moves nothing."""

    @dataclass
    class Settings(ZOSettings):
        q: int = setting(4, limit=Limit(ge=2))  # σ of a single loss is undefined

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        super().__init__(params, read_settings(type(self), options), direction="rademacher", sided=1)

    def coefficients(self, center, plus, minus):
        assert center is not None
        sigma = float(torch.tensor(plus, dtype=torch.float64).std(correction=0))
        if sigma == 0.0 or not math.isfinite(sigma):
            return [0.0] * len(plus)
        return [(p - center) / (self.q * sigma) for p in plus]


def centered_ranks(values: list[float]) -> list[float]:
    """Each value's rank among ``values`` (0 = lowest; ties share their mean rank), mapped linearly onto
    [−1/2, 1/2]: the rank weights of evolution strategies, which see only the order of the losses."""
    n = len(values)
    if n < 2:
        return [0.0] * n
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    start = 0
    while start < n:  # a run of equal values shares the mean of its ranks
        end = start
        while end + 1 < n and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2
        start = end + 1
    return [r / (n - 1) - 0.5 for r in ranks]


@OPTIMIZERS.register("zo-rank")
class RankZO(ZerothOrderBase):
    """Rank-based ZO (ordinal feedback): q mirrored probe pairs θ ± μz_j; the 2q losses are only *ranked*.
    With u the centered rank weight of each probe (lowest loss −1/2, highest +1/2), c_j = (u(+z_j) − u(−z_j))/q
    and θ −= lr·Σ_j c_j·z_j. The update is invariant to any increasing transform of the loss (its scale, an
    outlier probe): |c_j| ≤ 1/q, so a step never moves θ by more than lr·max_j ‖z_j‖, whatever the losses.
    q = 1 is a comparison step: θ −= lr·sign(L+ − L−)·z."""

    @dataclass
    class Settings(ZOSettings):
        q: int = setting(4, limit=AT_LEAST_ONE)
        direction: str = setting("gaussian", limit=Limit(choices=KINDS))

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        s = read_settings(type(self), options)
        super().__init__(params, s, direction=s.direction, sided=2)

    def coefficients(self, center, plus, minus):
        weights = centered_ranks(plus + minus)
        return [(weights[j] - weights[self.q + j]) / self.q for j in range(self.q)]


@OPTIMIZERS.register("hizoo")
class HiZOO(ZerothOrderBase):
    """HiZOO: probes along d = μ·H^{-1/2}·u with a diagonal Hessian estimate H (one buffer, starts at 1).

    With ΔL = L+ + L− − 2L_0 ≈ μ²·uᵀ H^{-1/2} ∇²L H^{-1/2} u and Gaussian u, E[ΔL/(2μ²)·(u_k² − 1)] is
    the k-th diagonal entry of H^{-1/2} ∇²L H^{-1/2}, so Ĥ_k = H_k·ΔL/(2μ²)·(u_k² − 1) estimates ∇²L_kk;
    H ← (1 − α)·H + α·|Ĥ|. The step is θ −= lr·Σ_j (L+ − L−)/(2μq)·H^{-1/2} u_j. That fourth-moment
    identity needs i.i.d. u, so HiZOO draws directions i.i.d. rather than from the shared pool.
    """

    linear_update = False

    @dataclass
    class Settings(ZOSettings):
        hessian_smoothing: float = setting(1e-6, limit=Limit(gt=0, lt=1))

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        s = read_settings(type(self), options)
        self.alpha = s.hessian_smoothing
        self._curvatures: list[float] = []
        self._seeds: list[int] = []
        super().__init__(params, s, direction="gaussian", sided=2)

    def make_directions(self) -> Directions:
        return _HessianScaled(self, IIDDirections(self.params, self.mu))

    @property
    def needs_center(self) -> bool:
        return True  # L_0 for the curvature ΔL

    def coefficients(self, center, plus, minus):
        assert center is not None
        self._curvatures = [(p + m - 2 * center) / (2 * self.mu**2) for p, m in zip(plus, minus, strict=True)]
        return super().coefficients(center, plus, minus)

    def update(self, seeds, coeffs, pending):
        self._seeds = seeds
        super().update(seeds, coeffs, pending)

    def apply_update(self, index, k, p, a, b, chunk, estimate, lr):
        chunk.add_(estimate, alpha=-lr)  # estimate already carries H^{-1/2} from the scaled directions
        hess = self.hessian(p, a, b)
        base = self.directions.base  # type: ignore[attr-defined]
        sample = torch.zeros_like(chunk)  # Σ_j κ_j (u_j² − 1) / q, the curvature sample before the H factor
        for seed, kappa in zip(self._seeds, self._curvatures, strict=True):
            d, _ = base.direction(seed, index, k)  # μ·u, unscaled
            sample.add_(d.square_().div_(self.mu**2).sub_(1.0), alpha=kappa / self.q)
        hess.mul_(1 - self.alpha).add_(sample.mul_(hess).abs_(), alpha=self.alpha)

    def hessian(self, p: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return self._buffer(p, "hessian", a, b, fill=1.0)  # H starts at the identity: the first probes are MeZO's


class _HessianScaled:
    """HiZOO's directions: the i.i.d. μ·u chunk times H^{-1/2} for the same chunk."""

    def __init__(self, owner: HiZOO, base: IIDDirections) -> None:
        self.owner, self.base, self.chunks = owner, base, base.chunks

    def prepare(self, seeds: list[int], step: int) -> None:
        self.base.prepare(seeds, step)

    def direction(self, seed: int, index: int, chunk: int) -> tuple[torch.Tensor, float]:
        d, m = self.base.direction(seed, index, chunk)
        p = self.owner.params[index]
        a, b = self.chunks[index][chunk]
        return d.mul_(self.owner.hessian(p, a, b).rsqrt()), m


@OPTIMIZERS.register("zo-lowrank")
class LowRankZO(ZerothOrderBase):
    """Low-rank subspace ZO: each matrix is perturbed by U·Z·Vᵀ (rank ``rank``; U, V refreshed every
    ``refresh`` steps, Z fresh per query); vectors and small tensors by a full Gaussian z. ZO-SGD update."""

    @dataclass
    class Settings(ZOSettings):
        rank: int = 8
        refresh: int = 50

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        s = read_settings(type(self), options)
        self.rank, self.refresh = s.rank, s.refresh
        super().__init__(params, s, direction="gaussian", sided=2)

    def make_directions(self) -> Directions:
        return LowRankDirections(self.params, self.mu, self.rank, self.refresh, self.seed)


@OPTIMIZERS.register("zo-muon")
class ZOMuon(ZerothOrderBase):
    """ZO-Muon: each matrix W (m × n) is probed only inside a random rank-r subspace, d = μ·√(m/r)·P·Z with
    P Haar-orthonormal (m × r, refreshed every ``refresh`` steps) and Z (r × n) fresh per query. The
    estimate projected there, G = Σ_j c_j·√(m/r)·Z_j, is orthogonalized by Newton–Schulz as in Muon and the
    step is W −= lr·√max(1, m/n)·P·NS(G). Vectors and small tensors take a plain ZO-SGD step."""

    linear_update = False

    @dataclass
    class Settings(ZOSettings):
        lr: float = setting(1e-4, limit=NON_NEGATIVE)
        rank: int = 16
        refresh: int = 10
        ns_steps: int = setting(5, limit=AT_LEAST_ONE)

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        s = read_settings(type(self), options)
        self.rank, self.refresh, self.ns_steps = s.rank, s.refresh, s.ns_steps
        super().__init__(params, s, direction="gaussian", sided=2)

    def make_directions(self) -> Directions:
        return SubspaceDirections(self.params, self.mu, self.rank, self.refresh, self.seed)

    round_updates = None  # type: ignore[assignment]  # its projected step is added in place: precision master

    def update(self, seeds, coeffs, pending):
        from unlearn.optim.spectral import newton_schulz  # the same iteration as Muon / SIFT

        dirs: SubspaceDirections = self.directions  # type: ignore[assignment]
        lrs = self._lrs()
        for seed, c in zip(seeds, coeffs, strict=True):  # vectors: ZO-SGD, with the pending undo folded in
            undo = self.undo_scale(pending, seed)
            self.shift(seed, [0.0 if dirs.matrix[i] else undo - lr * c / self.mu for i, lr in enumerate(lrs)])
        for i, p in enumerate(self.params):
            if not dirs.matrix[i]:
                continue
            m, n = p.shape
            projected = sum(c / self.mu * dirs.factor(seed, i) for seed, c in zip(seeds, coeffs, strict=True))
            step = newton_schulz(projected, steps=self.ns_steps).to(p) * (lrs[i] * math.sqrt(max(1.0, m / n)))
            basis = dirs.bases[i][0]
            flat = p.detach().view(-1)
            for k, (a, b) in enumerate(dirs.chunks[i]):
                chunk = flat[a:b]
                if pending is not None:
                    d, scale = dirs.direction(pending[0], i, k)
                    chunk.add_(d, alpha=-pending[1] * scale)
                chunk.sub_((basis[a // n: b // n] @ step).view(-1))
