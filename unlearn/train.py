"""The training loop: batches -> optimizer.step(closure) -> log. It never branches on the grade.

The closure only computes the loss; first-order optimizers differentiate it, zeroth-order ones
evaluate it at perturbed weights. Each closure call is one forward pass, which is what we log
alongside wall-clock seconds so grades can be compared on cost.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from unlearn.data import Encoded, endless_batches, on_device
from unlearn.errors import UserError
from unlearn.loss import Loss, loss_parts
from unlearn.objectives import Objective
from unlearn.optim.protocol import Diagnosing, Graded, Scheduled


@dataclass
class TrainResult:
    steps: int
    seconds: float
    forward_passes: int
    final_loss: float


def _grade(optimizer: torch.optim.Optimizer) -> str:
    """The grade that took this step: a hybrid's active block, else the optimizer's own (library optimizers used
    directly, outside the registry, declare none)."""
    if isinstance(optimizer, Scheduled) and optimizer.last_grade:
        return optimizer.last_grade
    return optimizer.grade if isinstance(optimizer, Graded) else "unknown"


def _lr(optimizer: torch.optim.Optimizer) -> float:
    lr = getattr(optimizer, "lr", None)
    return float(lr if lr is not None else optimizer.param_groups[0]["lr"])


def train(model: torch.nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
          forget: list[Encoded], retain: list[Encoded] | None, *, pad_id: int, batch_size: int,
          max_steps: int, seed: int, log_path: Path | None = None, desc: str = "unlearning",
          progress: bool = True, after_step: Callable[[int], None] | None = None) -> TrainResult:
    """`after_step(step)` runs after each step, outside the timed region (e.g. checkpoint evaluations)."""
    if max_steps < 1:
        raise UserError(f"max_steps must be >= 1, got {max_steps}")
    forget_stream = endless_batches(forget, batch_size, pad_id, seed)
    retain_stream = endless_batches(retain, batch_size, pad_id, seed + 1) if retain else None
    forwards = 0
    loss_value = float("nan")
    start = time.perf_counter()
    log: TextIO | None = log_path.open("w") if log_path else None
    try:
        bar = tqdm(range(1, max_steps + 1), desc=desc, disable=not progress, dynamic_ncols=True)
        for step in bar:
            forget_batch = on_device(model, next(forget_stream))
            retain_batch = on_device(model, next(retain_stream)) if retain_stream else None
            step_forwards = 0
            part_sums: dict[str, float] = {}

            def closure(fb=forget_batch, rb=retain_batch, sums=part_sums) -> Loss:
                nonlocal step_forwards
                step_forwards += 1
                loss = objective(model, fb, rb)
                for key, value in loss_parts(loss).items():  # averaged over the step's evaluations
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                return loss

            t0 = time.perf_counter()
            loss_value = float(optimizer.step(closure))
            seconds = time.perf_counter() - t0
            forwards += step_forwards
            if not math.isfinite(loss_value):
                raise UserError(f"loss became {loss_value} at step {step}; lower the learning rate "
                                f"(--lr) or check the data")
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if log:
                record = {"step": step, "loss": loss_value, "lr": _lr(optimizer),
                          "grade": _grade(optimizer),
                          "forwards": step_forwards, "seconds": round(seconds, 4),
                          "parts": {k: v / max(step_forwards, 1) for k, v in part_sums.items()}}
                if isinstance(optimizer, Diagnosing):
                    record["optimizer"] = {k: v for k, v in optimizer.diagnostics().items() if math.isfinite(v)}
                log.write(json.dumps(record) + "\n")
            if after_step is not None:
                paused = time.perf_counter()
                after_step(step)
                start += time.perf_counter() - paused  # evaluations are not training time
    finally:
        if log:
            log.close()
    return TrainResult(steps=max_steps, seconds=time.perf_counter() - start, forward_passes=forwards,
                       final_loss=loss_value)
