"""A loss split into named parts, the value every method returns and every closure may return.

Methods report their forget and retain terms separately (already weighted) so that conflict-aware
optimizers (SIFT) can differentiate them one by one and the training log can show both; everything else
optimizes their sum, ``total``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Loss:
    """A loss as named, already weighted parts; the optimized loss is their sum."""

    parts: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a Loss needs at least one part")

    @property
    def total(self) -> torch.Tensor:
        values = list(self.parts.values())
        total = values[0]
        for value in values[1:]:
            total = total + value
        return total

    def __float__(self) -> float:
        return float(self.total.detach())


LossValue = torch.Tensor | Loss


def total_loss(value: LossValue) -> torch.Tensor:
    return value.total if isinstance(value, Loss) else value


def loss_parts(value: LossValue) -> dict[str, torch.Tensor]:
    """Named parts of a closure's value; a bare tensor is the single part ``total``."""
    return dict(value.parts) if isinstance(value, Loss) else {"total": value}
