"""The training loop: batches -> optimizer.step(closure) -> log. It never branches on the grade.

The closure only computes the loss; first-order optimizers differentiate it, zeroth-order ones
evaluate it at perturbed weights. Each evaluation of the closure is one forward pass over the step's
batch, which is what we log alongside wall-clock seconds so grades can be compared on cost.

Each step's batch (`batch_size` rows, the same on every process) is cut into `grad_accum × processes`
contiguous shards; this process computes shards `rank·grad_accum …`, one micro-batch at a time. A shard's loss
is weighted by its share of the rows, so with one shard the loss is exactly the batch's, and a step depends on
the batch and on the number of shards, never on which process computed which shard: one process with
`grad_accum = 8` and eight processes with `grad_accum = 1` take the same steps.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from unlearn.compute.distributed import SINGLE, World, is_sharded
from unlearn.core.errors import UserError
from unlearn.optim.loss import Loss, LossValue, loss_parts
from unlearn.optim.protocol import Closure, Diagnosing, Graded, Scheduled, evaluate_parts, moving_params
from unlearn.tasks.data import Encoded, collate, endless_rows, on_device, split_rows
from unlearn.training.methods import Method
from unlearn.training.stopping import StopRule


@dataclass
class TrainResult:
    steps: int  # steps taken: max_steps, or fewer when a stop rule ended the run
    seconds: float
    forward_passes: int
    final_loss: float
    stopped_at: int | None = None  # the step at which `Monitor.rule` was met (None: it never was, or no rule)


@dataclass
class Monitor:
    """Measurements every `every` steps, outside the timed region, logged with the step as "eval"; training ends at
    the first one that meets `rule`."""

    every: int
    measure: Callable[[], dict[str, float]]
    rule: StopRule | None = None
    # No measurement before this step (HF Trainer's eval_delay): the early steps of a run aimed at a forget level
    # are far from it, and each measurement costs about as much as several training steps.
    delay: int = 0

    def due(self, step: int) -> bool:
        return step % self.every == 0 and step >= self.delay


@dataclass(frozen=True)
class Progress:
    """Where a resumed training picks up: steps done, and the seconds and forwards they took."""

    steps: int = 0
    seconds: float = 0.0
    forward_passes: int = 0
    final_loss: float = float("nan")


def _grade(optimizer: torch.optim.Optimizer) -> str:
    """The grade that took this step: a hybrid's active block, else the optimizer's own (library optimizers used
    directly, outside the registry, declare none)."""
    if isinstance(optimizer, Scheduled) and optimizer.last_grade:
        return optimizer.last_grade
    return optimizer.grade if isinstance(optimizer, Graded) else "unknown"


def _lr(optimizer: torch.optim.Optimizer) -> float:
    lr = getattr(optimizer, "lr", None)
    return float(lr if lr is not None else optimizer.param_groups[0]["lr"])


def _scaled(value: LossValue, weight: float) -> LossValue:
    if weight == 1.0:
        return value
    if isinstance(value, Loss):
        return Loss({k: v * weight for k, v in value.parts.items()})
    return value * weight


class StepClosure:
    """One step's loss over its sharded batch (see the module docstring): the `Sharded` closure optimizers
    evaluate or differentiate through `unlearn.optim.protocol`. It also sums the loss parts it computed, for the
    log, and counts evaluations (rounds over the shards) as forward passes."""

    def __init__(self, model: torch.nn.Module, method: Method, forget: list[Encoded],
                 retain: list[Encoded] | None, pad_id: int, grad_accum: int, world: World) -> None:
        self.model, self.method, self.world, self.grad_accum = model, method, world, grad_accum
        self.processes = world.size
        total = grad_accum * world.size
        mine = slice(world.rank * grad_accum, (world.rank + 1) * grad_accum)
        forget_shards = split_rows(forget, total)[mine]
        retain_shards = split_rows(retain, total)[mine] if retain else [None] * grad_accum
        self._local: list[tuple[int, float, dict, dict | None]] = []  # (shard, weight, forget batch, retain batch)
        for k, (f, r) in enumerate(zip(forget_shards, retain_shards, strict=True)):
            if f:  # a short last batch of an epoch can leave a shard empty
                # A retain shard left empty by a short retain batch takes the whole retain batch instead: the
                # retain term needs rows, and that batch's mean estimates the same loss.
                r = r or retain
                rb = on_device(model, collate(r, pad_id)) if r else None
                self._local.append((k, len(f) / len(forget), on_device(model, collate(f, pad_id)), rb))
        self.rounds = 0
        # Each part's detached value per evaluation, read (a host sync) only when the step is logged: a float() here
        # would make the host wait for every forward before it could queue the backward.
        self.part_values: dict[str, list[torch.Tensor]] = {}
        self.gradients_summed = world.distributed and is_sharded(model)  # FSDP sums them in its backward

    def _shard(self, weight: float, fb: dict, rb: dict | None) -> Closure:
        def closure() -> LossValue:
            loss = _scaled(self.method(self.model, fb, rb), weight)
            for key, value in loss_parts(loss).items():
                self.part_values.setdefault(key, []).append(value.detach())
            return loss
        return closure

    def shards(self) -> list[Closure]:
        self.rounds += 1
        return [self._shard(w, fb, rb) for _, w, fb, rb in self._local]

    def _all(self, values: list[float]) -> list[float]:
        """This process's per-shard values (0 for empty shards), then every process's, in shard order."""
        local = [0.0] * self.grad_accum
        for (k, *_), value in zip(self._local, values, strict=True):
            local[k] = value
        return self.world.gather_floats(local)

    def sum_values(self, values: list[float]) -> float:
        every = self._all(values)
        total = every[0]
        for value in every[1:]:  # in shard order, the same on every process
            total += value
        return total

    def sum_tensors(self, tensors: list[torch.Tensor]) -> None:
        self.world.sum_tensors(tensors)

    def __call__(self) -> LossValue:
        """The whole loss with its graph, for optimizers that call the closure themselves (outside the registry).
        Only defined when this process holds the whole batch."""
        if self.world.distributed:
            raise UserError("this optimizer calls the closure directly, so it cannot split a step over processes")
        parts = [shard() for shard in self.shards()]
        total = parts[0]
        for part in parts[1:]:
            total = Loss({k: v + loss_parts(part)[k] for k, v in loss_parts(total).items()})
        return total

    def logged_parts(self) -> dict[str, float]:
        """Each part averaged over the step's evaluations and summed over the processes (a collective call)."""
        part_sums: dict[str, float] = {}
        for key, values in self.part_values.items():
            total = 0.0
            for value in values:  # summed as Python floats in evaluation order, as they always were
                total += float(value)
            part_sums[key] = total
        keys = sorted(part_sums)
        if self.world.distributed:
            # Rank 0 always computes the first (largest) shard; a rank whose shards are all empty has no keys.
            keys = list(self.world.broadcast_object(keys))  # type: ignore[call-overload]
            every = self.world.gather_floats([part_sums.get(k, 0.0) for k in keys])
            sums = [sum(every[i::len(keys)]) for i in range(len(keys))] if keys else []
        else:
            sums = [part_sums[k] for k in keys]
        return {k: v / max(self.rounds, 1) for k, v in zip(keys, sums, strict=True)}


def retain_seed(seed: int) -> int:
    """The retain stream's seed (the forget stream uses `seed`): methods that cache per retain item ask which
    items training will draw (`unlearn.tasks.data.rows_used`) with it."""
    return seed + 1


PROBE_ROWS = 32  # fixed forget and retain rows a scheduled (hybrid) run is measured on at its block boundaries


def _first_rows(items: list[Encoded], batch_size: int, seed: int, max_steps: int) -> list[Encoded]:
    """Up to PROBE_ROWS items, in the order the training stream of `seed` draws them in its first steps: rows training
    uses anyway (methods that cache per retain item, RMU, have them cached)."""
    stream = endless_rows(items, batch_size, seed)
    rows: list[Encoded] = []
    for _ in range(min(max_steps, -(-PROBE_ROWS // batch_size))):
        rows.extend(next(stream))
    return rows[:PROBE_ROWS]


class BlockProbe:
    """The method's parts on fixed rows (those the first steps draw), measured before the first step of every
    block of a scheduled optimizer and after the last step: each step's own parts come from that step's random
    batch, too noisy to tell what one block did; these are comparable from block to block."""

    def __init__(self, optimizer: Scheduled, model: torch.nn.Module, method: Method,
                 rows: tuple[list[Encoded], list[Encoded] | None], pad_id: int, grad_accum: int, world: World) -> None:
        self.optimizer, self.model, self.method, self.rows = optimizer, model, method, rows
        self.pad_id, self.grad_accum, self.world = pad_id, grad_accum, world

    def starts_block(self, step: int) -> bool:
        """Whether 1-based ``step`` is the first of a block."""
        return step == 1 or self.optimizer.current_grade(step - 1) != self.optimizer.current_grade(step - 2)

    def measure(self) -> dict[str, float]:
        closure = StepClosure(self.model, self.method, *self.rows, self.pad_id,
                              min(self.grad_accum, len(self.rows[0])), self.world)
        with torch.no_grad():
            return evaluate_parts(closure)


GUARD_WINDOW = 5  # updates the guard averages over
GUARD_POSITIONS = 256  # sampled positions per parameter (fewer for smaller ones)
GUARD_PARAMETERS = 16  # parameters sampled, evenly spread over the list (every layer type of a decoder): each one
# sampled is a gather per step, which on a GPU is a launch; 272 of them would cost milliseconds of a 30 ms step


class UpdateGuard:
    """The share of trained weights each step left bit-unchanged, read at fixed sampled positions of (up to
    GUARD_PARAMETERS of) the parameters the step may move (a hybrid's active block, a zeroth-order member's
    ``include``). Logged per step;
    when the mean over the last GUARD_WINDOW counted steps reaches ``limit`` the run stops: its updates are
    rounding away (bf16 weights updated by rounding to nearest), so it cannot learn, and every number measured
    after it would be noise presented as a result. Steps a zeroth-order rollback undid are not counted."""

    def __init__(self, limit: float | None) -> None:
        self.limit = limit
        self.shares: deque[float] = deque(maxlen=GUARD_WINDOW)
        self._positions: dict[int, torch.Tensor] = {}

    def _sample(self, params: list[torch.Tensor]) -> torch.Tensor:
        values = []
        for p in params:
            local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP shard: this process's slice
            flat = local.detach().reshape(-1)
            if not flat.numel():
                continue
            index = self._positions.get(id(p))
            if index is None or index.device != flat.device:
                gen = torch.Generator().manual_seed(len(self._positions))
                index = torch.randint(0, flat.numel(), (min(flat.numel(), GUARD_POSITIONS),), generator=gen)
                index = self._positions[id(p)] = index.to(flat.device)
            values.append(flat[index].float())
        return torch.cat(values) if values else torch.zeros(0)

    def before(self, optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], torch.Tensor]:
        params = moving_params(optimizer)
        if len(params) > GUARD_PARAMETERS:
            step = len(params) / GUARD_PARAMETERS
            params = [params[int(k * step)] for k in range(GUARD_PARAMETERS)]
        return params, self._sample(params)

    def after(self, taken: tuple[list[torch.Tensor], torch.Tensor], step: int, counted: bool) -> float | None:
        params, before = taken
        if not before.numel():
            return None
        share = float((self._sample(params) == before).float().mean())
        if counted:
            self.shares.append(share)
        if self.limit is not None and counted and len(self.shares) == GUARD_WINDOW:
            mean = sum(self.shares) / GUARD_WINDOW
            if mean >= self.limit:
                raise UserError(
                    f"step {step}: the last {GUARD_WINDOW} updates left {mean:.0%} of the trained weights "
                    f"bit-unchanged: they round away in low-precision weights; use --precision master (fp32 master "
                    f"weights) or lean (stochastic rounding), or --dtype fp32 (train.max_unchanged sets this check)")
        return share


def _rolled_back(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, Diagnosing) and bool(optimizer.diagnostics().get("rolled_back"))


class TrainingClock:
    """Training seconds: wall time since the start (plus what an interrupted run had already trained), less the
    time spent inside `paused()`: probes, evaluations, checkpoints and callbacks are not training time."""

    def __init__(self, already: float = 0.0) -> None:
        self._begun = time.perf_counter() - already
        self._paused_at: float | None = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused_at = time.perf_counter()
        try:
            yield
        finally:
            self._begun += time.perf_counter() - self._paused_at
            self._paused_at = None

    def seconds(self) -> float:
        """Training seconds so far (inside a pause: up to the pause)."""
        now = self._paused_at if self._paused_at is not None else time.perf_counter()
        return now - self._begun


def check_batching(batch_size: int, grad_accum: int, world: World) -> None:
    shards = grad_accum * world.size
    if batch_size < shards:
        raise UserError(f"train.batch_size {batch_size} is smaller than its shards (grad_accum {grad_accum} x "
                        f"{world.size} processes = {shards}): every micro-batch needs a row")


def train(model: torch.nn.Module, method: Method, optimizer: torch.optim.Optimizer,
          forget: list[Encoded], retain: list[Encoded] | None, *, pad_id: int, batch_size: int,
          max_steps: int, seed: int, log_path: Path | None = None, desc: str = "unlearning",
          progress: bool = True, after_step: Callable[[int], None] | None = None, grad_accum: int = 1,
          world: World = SINGLE, start: Progress = Progress(), checkpoint: Callable[[Progress], None] | None = None,
          checkpoint_every: int = 0, monitor: Monitor | None = None,
          max_unchanged: float | None = 0.5, rounded: bool = False,
          on_record: Callable[[dict], None] | None = None) -> TrainResult:
    """`after_step(step)` runs after each step and `checkpoint(progress)` after every `checkpoint_every`-th, both
    outside the timed region, as does `monitor`. `start`: the steps already done by an interrupted run (its log is
    appended to). `max_unchanged`: the `UpdateGuard`'s limit (None: only logged). `rounded`: the optimizer adds
    stochastically rounded updates, which keep small updates in expectation while leaving most weights unchanged at
    any one step: the share is logged, never a reason to stop. `on_record(record)` gets each log.jsonl record once
    it is written (a tracker mirroring the log), outside the timed region."""
    if max_steps < 1:
        raise UserError(f"max_steps must be >= 1, got {max_steps}")
    check_batching(batch_size, grad_accum, world)
    forget_stream = endless_rows(forget, batch_size, seed, start.steps)
    retain_stream = endless_rows(retain, batch_size, retain_seed(seed), start.steps) if retain else None
    forwards = start.forward_passes
    loss_value = start.final_loss
    clock = TrainingClock(start.seconds)
    log: TextIO | None = log_path.open("a" if start.steps else "w") if log_path else None
    # On every process (its forwards are collectives under a launcher); only rank 0 logs what it measured.
    probe = BlockProbe(optimizer, model, method, (
        _first_rows(forget, batch_size, seed, max_steps),
        _first_rows(retain, batch_size, retain_seed(seed), max_steps) if retain else None),
        pad_id, grad_accum, world) if isinstance(optimizer, Scheduled) else None
    stopped_at: int | None = None
    step = start.steps
    guard = UpdateGuard(None if rounded else max_unchanged)
    if monitor is not None and monitor.rule is not None and start.steps and monitor.due(start.steps):
        # A checkpoint taken at the step that met the rule (the run was then killed during its final evaluation):
        # that step's measurement is repeated rather than training past it.
        with clock.paused():
            if monitor.rule.reached(monitor.measure()):
                stopped_at = start.steps
    try:
        last = max_steps if stopped_at is None else start.steps
        bar = tqdm(range(start.steps + 1, last + 1), desc=desc, disable=not progress, dynamic_ncols=True,
                   initial=start.steps, total=max_steps)
        for step in bar:
            closure = StepClosure(model, method, next(forget_stream),
                                  next(retain_stream) if retain_stream else None, pad_id, grad_accum, world)
            method.begin_step(step)
            block_start = None
            if probe is not None and probe.starts_block(step):
                with clock.paused():
                    block_start = probe.measure()
            taken = guard.before(optimizer)
            t0 = time.perf_counter()
            loss_value = float(optimizer.step(closure))
            seconds = time.perf_counter() - t0
            unchanged = guard.after(taken, step, counted=not _rolled_back(optimizer))
            step_forwards = closure.rounds * method.passes_per_loss
            forwards += step_forwards
            if not math.isfinite(loss_value):
                raise UserError(f"loss became {loss_value} at step {step}; lower the learning rate "
                                f"(--lr) or check the data")
            parts = closure.logged_parts()
            bar.set_postfix(loss=f"{loss_value:.4f}", **{k: f"{v:.4f}" for k, v in parts.items() if k != "total"})
            evaluation = None
            if monitor is not None and monitor.due(step):
                with clock.paused():
                    evaluation = monitor.measure()
                if monitor.rule is not None and monitor.rule.reached(evaluation):
                    stopped_at = step
            block_end = None
            if probe is not None and (step == max_steps or stopped_at is not None):
                with clock.paused():
                    block_end = probe.measure()  # the same rows after the last step
            if log:
                record = {"step": step, "loss": loss_value, "lr": _lr(optimizer),
                          "grade": _grade(optimizer), "forwards": step_forwards, "seconds": round(seconds, 4),
                          "parts": parts}
                if unchanged is not None:
                    record["unchanged"] = round(unchanged, 4)  # share of sampled trained weights left as they were
                if isinstance(optimizer, Diagnosing):
                    record["optimizer"] = {k: v for k, v in optimizer.diagnostics().items() if math.isfinite(v)}
                if block_start is not None:
                    record["probe"] = block_start  # fixed rows, before this step (the first of its block)
                if block_end is not None:
                    record["probe_end"] = block_end
                if evaluation is not None:
                    record["eval"] = evaluation  # the benchmark's probe after this step
                log.write(json.dumps(record) + "\n")
                log.flush()  # a checkpoint taken next must find every line of the steps it covers
                if on_record is not None:
                    with clock.paused():
                        on_record(record)
            with clock.paused():
                if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                    checkpoint(Progress(step, clock.seconds(), forwards, loss_value))
                if after_step is not None:
                    after_step(step)
            if stopped_at is not None:
                bar.close()
                break
    finally:
        if log:
            log.close()
    return TrainResult(steps=step, seconds=clock.seconds(), forward_passes=forwards,
                       final_loss=loss_value, stopped_at=stopped_at)
