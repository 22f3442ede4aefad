"""Options every zeroth-order member accepts, which keep a ZO run from being wrecked by one bad probe.

Measured on the embedded benchmark before these existed: below some learning rate ZO-SGD moves nothing, and
above it one probe whose two losses differ a lot gives a coefficient c = (L+ − L−)/2μ large enough that the
step θ −= lr·c·z blows the model up (retain perplexity 6.7e9) and it never recovers. The options:

* ``normalize``: c_j ← c_j / RMS, RMS the bias-corrected running root-mean-square of past coefficients
  (β = ``normalize_beta``). The step's size no longer follows the loss scale: each weight moves by about
  lr·|z_i| per step, as with a sign or Adam step, so lr means the same thing across methods.
* ``clip``: |c_j| ≤ clip after normalizing. With it, no probe can move θ by more than lr·clip·Σ_j ‖z_j‖.
* ``warmup`` / ``schedule``: linear warm-up over ``warmup`` steps, then constant, linear or cosine decay to 0
  at ``total_steps`` (the run's steps, filled in by the run).
* ``rollback``: after the update one more forward on the same batch; if the loss rose by more than
  ``rollback`` above the step's starting loss (the probes' mean: L(θ) up to O(μ²)), or is not finite, the
  weights and the member's buffers are put back bit-exactly from a copy kept during the step (one copy of the
  trainable parameters — negligible with LoRA or ``include``, 2x for full fine-tuning). ``rollback_on:
  retain`` watches the method's retain part instead of the total: measured, a ZO step can lower the total
  (forgetting) while it wrecks the retain term, which a rollback on the total then lets through.
  ``rollback_on`` may be a list (``[retain, total]``): the first part the loss has is watched.
* ``include``: a regular expression on parameter names; only matching parameters are probed and updated (as
  RMU trains a few ``down_proj``s). Fewer dimensions is what makes a ZO estimate informative: its variance
  grows with the number of perturbed weights. A list of patterns is tried in order and the first that selects
  a trainable parameter is used: a default can name the norms and still work when only LoRA adapters train.

Not a stabilizer, but taken by every member that probes along plain Gaussian or Rademacher directions:

* ``draw``: ``pool`` (default) views windows of one drawn pool per seed (fast on the CPU: a 16 MB draw per step
  instead of one as large as the model); ``parameter`` draws each parameter's whole direction at once on its
  device, from a generator seeded by (seed, parameter), as MeZO does: one launch per parameter per pass, for a
  GPU, at the cost of one parameter-sized temporary.

Every count (clipped coefficients, rolled-back steps, forwards) is logged per step in log.jsonl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from unlearn.core.settings import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    UNIT_OPEN,
    Limit,
    SettingError,
    setting,
)

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class Stabilizers:
    clip: float | None = setting(None, limit=POSITIVE)
    normalize: bool = False
    normalize_beta: float = setting(0.99, limit=UNIT_OPEN)
    warmup: int = setting(0, limit=NON_NEGATIVE)
    schedule: str = setting("constant", limit=Limit(choices=SCHEDULES))
    total_steps: int | None = setting(None, limit=AT_LEAST_ONE)
    rollback: float | None = setting(None, limit=NON_NEGATIVE)
    # The loss part the rollback watches: total, or a part the method names (retain); or a list of them, the
    # first the loss has is used (so one config serves methods with and without a retain term).
    rollback_on: str | list[str] = "total"
    # A name pattern, or a list of them tried in order: the first that selects a trainable parameter is used (so
    # one config serves full weights, LoRA adapters and RMU's few trainable layers).
    include: str | list[str] | None = None
    draw: str = setting("pool", limit=Limit(choices=("pool", "parameter")))

    @property
    def rollback_parts(self) -> list[str]:
        return [self.rollback_on] if isinstance(self.rollback_on, str) else list(self.rollback_on)

    @property
    def include_patterns(self) -> list[str] | None:
        if self.include is None:
            return None
        return [self.include] if isinstance(self.include, str) else list(self.include)

    def __post_init__(self) -> None:
        for key, value in (("rollback_on", self.rollback_on), ("include", self.include)):
            if isinstance(value, list | tuple) and not value:
                raise SettingError(f"{key} must not be an empty list")
        if self.schedule != "constant" and self.total_steps is None:
            raise SettingError(f"schedule '{self.schedule}' needs total_steps (a run fills it in)")

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate at 0-based ``step``."""
        factor = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.schedule == "constant" or self.total_steps is None:
            return factor
        span = max(self.total_steps - self.warmup, 1)
        done = min(max(step - self.warmup, 0) / span, 1.0)
        decay = 1.0 - done if self.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
        return factor * decay


class Coefficients:
    """Normalizing and clipping of one member's coefficients, with the running RMS as its only state."""

    def __init__(self, settings: Stabilizers) -> None:
        self.settings = settings
        self.mean_square = 0.0
        self.seen = 0
        self.clipped = 0  # in the last step

    def __call__(self, coeffs: list[float]) -> list[float]:
        s = self.settings
        if s.normalize and coeffs:
            self.seen += 1
            beta = s.normalize_beta
            self.mean_square = beta * self.mean_square + (1 - beta) * sum(c * c for c in coeffs) / len(coeffs)
            rms = math.sqrt(self.mean_square / (1 - beta**self.seen))
            coeffs = [c / rms if rms > 0 else 0.0 for c in coeffs]
        self.clipped = 0
        if s.clip is not None:
            bounded = [max(-s.clip, min(s.clip, c)) for c in coeffs]
            self.clipped = sum(b != c for b, c in zip(bounded, coeffs, strict=True))
            coeffs = bounded
        return coeffs

    def state(self) -> dict[str, float]:
        return {"mean_square": self.mean_square, "seen": self.seen}

    def load(self, state: dict[str, float]) -> None:
        self.mean_square, self.seen = float(state["mean_square"]), int(state["seen"])
