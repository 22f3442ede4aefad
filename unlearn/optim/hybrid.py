"""Hybrid grade: blocks of gradient-based steps alternating with blocks of zeroth-order steps."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from unlearn.core.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, setting
from unlearn.optim.protocol import (
    OPTIMIZERS,
    Closure,
    Diagnosing,
    accepts,
    build_optimizer,
    moving_params,
    read_settings,
    require_closure,
    rounds_updates,
)


def _sub_spec(role: str, spec: Any, gradients: bool) -> tuple[str, dict[str, Any]]:
    """The `fo` (any gradient-based grade) or `zo` (any zeroth-order member) block's name and options."""
    if not isinstance(spec, dict):
        raise ValueError(f"hybrid '{role}' must be a mapping like {{'name': 'adamw', 'lr': 1e-5}}, got {spec!r}")
    options = dict(spec)
    name = options.pop("name", None)
    if name is None:
        raise ValueError(f"hybrid '{role}' needs a 'name', e.g. {{'name': 'adamw', 'lr': 1e-5}}")
    cls = OPTIMIZERS.lookup(name)
    if cls.uses_gradients != gradients or cls.grade == "hybrid":  # type: ignore[attr-defined]
        wanted = "gradient-based (not hybrid)" if gradients else "zeroth-order"
        raise ValueError(f"hybrid '{role}' must be a {wanted} optimizer, got '{name}' "
                         f"({cls.grade})")  # type: ignore[attr-defined]
    return name, options


@OPTIMIZERS.register("hybrid")
class Hybrid(torch.optim.Optimizer):
    """Delegates each step to ``self.fo`` or ``self.zo``, which own the real state and learning rates.

    ``block`` first-order steps, then ``round(block * ratio)`` zeroth-order steps, repeated. With
    ``total_steps`` the pattern is laid out backwards from the last step, so the run ends on a complete ZO
    block (the first block may be partial); without it the run starts with a full first-order block.
    ``fo`` / ``zo`` are ``{"name": <registered optimizer>, **options}``. ``zo_lr_ratio`` sets the ZO blocks'
    learning rate to ``fo.lr × zo_lr_ratio`` (so a sweep over the FO rate keeps the two in step); without it
    ``zo.lr`` is used. The ZO member's schedule (``zo.schedule``/``zo.warmup``) runs over the ZO steps alone.
    Schedule learning rates on ``self.fo`` / ``self.zo``; this object's ``param_groups[*]["lr"]`` mirror the
    active one for logging.
    """

    grade = "hybrid"
    uses_gradients = True  # its first-order blocks do

    @dataclass(frozen=True)
    class Settings:
        fo: dict[str, Any] | None = None  # {"name": <gradient-based optimizer>, **its settings}; default AdamW
        zo: dict[str, Any] | None = None  # {"name": <zeroth-order member>, **its settings}; default zo
        block: int = setting(20, limit=AT_LEAST_ONE)
        ratio: float = setting(1.0, limit=NON_NEGATIVE)
        total_steps: int | None = setting(None, limit=AT_LEAST_ONE)
        zo_lr_ratio: float | None = setting(None, limit=POSITIVE)

    def __init__(self, params: Iterable[torch.Tensor], **options: Any) -> None:
        s = read_settings(type(self), options)
        fo, zo, block, ratio, total_steps, zo_lr_ratio = s.fo, s.zo, s.block, s.ratio, s.total_steps, s.zo_lr_ratio
        params = list(params)  # shared by both sub-optimizers and this one; a generator would run dry
        self.fo_block, self.zo_block = block, round(block * ratio)
        self.total_steps = total_steps
        fo_name, fo_options = _sub_spec("fo", fo or {"name": "adamw", "lr": 1e-5}, gradients=True)
        zo_name, zo_options = _sub_spec("zo", zo or {"name": "zo", "lr": 1e-5}, gradients=False)
        self.fo = build_optimizer(fo_name, params, section="optimizer.fo", **fo_options)
        if zo_lr_ratio is not None:
            zo_options["lr"] = float(self.fo.param_groups[0]["lr"]) * zo_lr_ratio
        if total_steps is not None and accepts(OPTIMIZERS.lookup(zo_name), "total_steps"):
            zo_options.setdefault("total_steps", max(1, sum(not self._fo_at(i) for i in range(total_steps))))
        self.zo = build_optimizer(zo_name, params, section="optimizer.zo", **zo_options)
        self.steps_taken = 0
        self.last_grade: str | None = None
        super().__init__(params, {"lr": self.lr})  # mirrors the active sub-optimizer, for logging

    def _fo_at(self, step_index: int) -> bool:
        period = self.fo_block + self.zo_block
        if self.total_steps is None:
            return step_index % period < self.fo_block
        from_end = (self.total_steps - 1 - step_index) % period  # 0 on the last step
        return from_end >= self.zo_block

    def _optimizer_at(self, step_index: int) -> torch.optim.Optimizer:
        return self.fo if self._fo_at(step_index) else self.zo

    def current_grade(self, step_index: int) -> str:
        """Grade of the sub-optimizer that runs step ``step_index`` (0-based)."""
        return self._optimizer_at(step_index).grade  # type: ignore[attr-defined]

    @property
    def lr(self) -> float:
        """Learning rate of the sub-optimizer that ran the last step (the next one before any step)."""
        return float(self._optimizer_at(max(self.steps_taken - 1, 0)).param_groups[0]["lr"])

    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        closure = require_closure(closure)
        opt = self._optimizer_at(self.steps_taken)
        loss = opt.step(closure)
        self.steps_taken += 1
        self.last_grade = opt.grade  # type: ignore[attr-defined]
        for group in self.param_groups:
            group["lr"] = self.lr
        return loss

    def round_updates(self, seed: int) -> None:
        """Both blocks add stochastically rounded updates to bf16 weights (the `lean` precision)."""
        for member in (self.fo, self.zo):
            if not rounds_updates(member):
                raise ValueError(f"hybrid member '{type(member).__name__}' cannot round its updates stochastically")
            member.round_updates(seed)  # type: ignore[attr-defined]

    def probe_without_writing(self, model: torch.nn.Module) -> None:
        """The zeroth-order block probes on transient copies (``ZerothOrderBase.probe_without_writing``)."""
        self.zo.probe_without_writing(model)  # type: ignore[attr-defined]

    def moving_params(self) -> list[torch.Tensor]:
        """The parameters the next step may move: those of the block that takes it."""
        return moving_params(self._optimizer_at(self.steps_taken))

    def diagnostics(self) -> dict[str, float]:
        """The counters of the sub-optimizer that ran the last step (a ZO block's clips and rollbacks)."""
        opt = self._optimizer_at(max(self.steps_taken - 1, 0))
        return opt.diagnostics() if isinstance(opt, Diagnosing) else {}

    def state_dict(self) -> dict[str, Any]:
        return {"fo": self.fo.state_dict(), "zo": self.zo.state_dict(), "steps_taken": self.steps_taken}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fo.load_state_dict(state_dict["fo"])
        self.zo.load_state_dict(state_dict["zo"])
        self.steps_taken = state_dict["steps_taken"]
