"""The closure protocol shared by every optimizer grade, the registry, and ``build_optimizer``.

The training loop calls ``opt.step(closure)`` whatever the grade: the closure only *evaluates* the loss
(it never calls ``backward``), so each optimizer decides how often to evaluate it and whether to
differentiate it. That is what lets first-order, sign, second-order, spectral, zeroth-order and hybrid
optimizers share one loop.

The closure returns either a scalar tensor or a ``Loss``: the method's named, already weighted parts
(``forget``, ``retain``) whose sum is the optimized loss. Most optimizers only read ``total_loss(...)``;
conflict-aware ones (SIFT) differentiate the parts separately. Parameters may be given as tensors or as
``(name, tensor)`` pairs (``model.named_parameters()``), as torch.optim accepts; name-aware optimizers
(Muon, SIFT) use the names to tell hidden matrices from embeddings and to select matrices by pattern.

The training loop's closure is also ``Sharded``: its batch is split into micro-batches (gradient accumulation)
and across processes (data parallelism). Optimizers never see that split: they go through ``evaluate``
(zeroth-order: the loss as one number) and ``backward`` (gradient grades: .grad filled, loss returned), which
loop over this process's shards and sum over the processes; a plain closure is one shard of one process.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch

from unlearn.core.registry import Registry
from unlearn.core.settings import InvalidSettings, declares_settings, from_mapping, setting_names
from unlearn.optim.loss import LossValue, loss_parts, total_loss
from unlearn.optim.rounding import LeanStep

Closure = Callable[[], LossValue]
Params = Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


# The grades, and whether an optimizer of that grade differentiates the loss.
GRADES = {"first-order": True, "sign": True, "second-order": True, "spectral": True, "zeroth-order": False,
          "hybrid": True}


@runtime_checkable
class Graded(Protocol):
    """What every registered optimizer declares beside torch.optim.Optimizer's own interface (the registry
    refuses a class without it)."""

    grade: str  # one of GRADES
    uses_gradients: bool  # False: it only evaluates the closure (zeroth-order), so no backward pass runs
    # Optional declarations, read with getattr: `data_parallel = False` refuses several processes (its state is
    # estimated per process); `sharded_parameters = True` accepts FSDP's parameter shards (train.parallel=fsdp).


@runtime_checkable
class Diagnosing(Protocol):
    """An optimizer with per-step counters worth logging (SIFT's conflict counts): log.jsonl records them."""

    def diagnostics(self) -> dict[str, float]: ...


@runtime_checkable
class Scheduled(Protocol):
    """An optimizer that delegates each step to another grade (hybrid): log.jsonl records which one ran, and the
    training loop measures fixed forget and retain rows at each block's start (so a block's effect is read off)."""

    last_grade: str | None

    def current_grade(self, step_index: int) -> str:
        """The grade that runs 0-based step ``step_index``."""
        ...


@runtime_checkable
class Sharded(Protocol):
    """A closure over a batch split in shards (micro-batches here, and other processes' shards elsewhere)."""

    processes: int  # how many processes hold shards of this batch
    gradients_summed: bool  # the model itself sums gradients across the processes in backward (FSDP)

    def shards(self) -> list[Closure]:
        """This process's shards, each returning its part of the loss (the parts of all shards sum to it)."""
        ...

    def sum_values(self, values: list[float]) -> float:
        """The total over every process of this process's per-shard `values`, summed in shard order."""
        ...

    def sum_tensors(self, tensors: list[torch.Tensor]) -> None:
        """In place: each tensor summed over the processes (gradients)."""
        ...


class _Whole:
    """A plain closure seen as one shard of one process."""

    processes = 1
    gradients_summed = False

    def __init__(self, closure: Closure) -> None:
        self._closure = closure

    def shards(self) -> list[Closure]:
        return [self._closure]

    def sum_values(self, values: list[float]) -> float:
        return values[0] if len(values) == 1 else sum(values)

    def sum_tensors(self, tensors: list[torch.Tensor]) -> None:
        pass


def sharded(closure: Closure) -> Sharded:
    return closure if isinstance(closure, Sharded) else _Whole(closure)


def evaluate(closure: Closure) -> float:
    """The loss over the whole (global) batch, without autograd: what zeroth-order grades compare."""
    split = sharded(closure)
    return split.sum_values([float(total_loss(shard())) for shard in split.shards()])


def evaluate_parts(closure: Closure) -> dict[str, float]:
    """Like ``evaluate``, part by part (``total`` included): the whole batch's forget and retain terms."""
    split = sharded(closure)
    shards = []
    for shard in split.shards():
        value = shard()
        # The total exactly as `evaluate` computes it (in the loss's own precision): ZO differences are tiny.
        shards.append({**{k: float(v.detach()) for k, v in loss_parts(value).items()},
                       "total": float(total_loss(value))})
    keys = sorted(shards[0]) if shards else ["total"]
    return {k: split.sum_values([s.get(k, 0.0) for s in shards]) for k in keys}


def backward(closure: Closure, params: Iterable[torch.Tensor], create_graph: bool = False) -> torch.Tensor:
    """Fill ``.grad`` of ``params`` with the gradient of the whole batch's loss (one backward per shard, then one
    sum over the processes) and return that loss, detached, as float32."""
    split = sharded(closure)
    losses = []
    for shard in split.shards():
        loss = total_loss(shard())
        loss.backward(create_graph=create_graph)
        losses.append(loss.detach())  # read after every backward is queued: no host sync between the shards
        del loss  # this shard's graph goes before the next one is built
    values = [float(value) for value in losses]
    if split.processes > 1 and not split.gradients_summed:
        grads = []
        for p in params:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)  # every rank must all-reduce the same tensors
            if p.grad is not None:
                grads.append(p.grad)
        split.sum_tensors(grads)
    return torch.tensor(split.sum_values(values), dtype=torch.float32)


def _declares_grade(name: str, cls: type) -> None:
    grade, gradients = getattr(cls, "grade", None), getattr(cls, "uses_gradients", None)
    if grade not in GRADES or not isinstance(gradients, bool):
        raise TypeError(f"optimizer '{name}' must declare grade (one of {', '.join(GRADES)}) and uses_gradients "
                        f"(got {grade!r}, {gradients!r})")
    declares_settings("optimizer")(name, cls)


OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry("optimizer", check=_declares_grade,
                                                              members="unlearn.optim")


def accepts(cls: type, option: str) -> bool:
    """Whether the optimizer class declares the setting ``option``."""
    return option in setting_names(cls)


def read_settings(cls: type, options: dict[str, Any]) -> Any:
    """``cls.Settings`` from a constructor's keyword options: the toolkit's one settings check, whose failures
    are one-line ValueErrors (a registry build checked them already, naming the config's section)."""
    return from_mapping(cls.Settings, options, "optimizer", owner=f"optimizer {cls.__name__}")


def compile_pattern(option: str, pattern: str) -> re.Pattern[str]:
    """A name-pattern option (SIFT's `pattern`, a ZO member's `include`) compiled, or a one-line ValueError."""
    try:
        return re.compile(pattern)
    except re.error as err:  # not a ValueError: build_optimizer would not turn it into one line
        raise ValueError(f"{option} is not a valid regular expression ({err}): {pattern!r}") from err


class ModelDependent(ValueError):
    """Options that are fine in themselves but select nothing in *this* model (a name pattern, say): only the
    real build can tell, so ``dry_build`` lets it pass."""


def require_closure(closure: Closure | None) -> Closure:
    if closure is None:
        raise ValueError("step() needs a closure that returns the loss tensor (without calling backward)")
    return closure


def rounds_updates(optimizer: Any) -> bool:
    """Whether an optimizer (or its class) can add its updates to bf16 weights by stochastic rounding (the `lean`
    precision): it has ``round_updates(seed)``, which turns that on. Others are refused under `lean`."""
    return callable(getattr(optimizer, "round_updates", None))


def moving_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters the optimizer's next step may move (what the training loop's guard samples): its
    ``moving_params()`` where it says (a hybrid's active block; a zeroth-order member's ``include``), else every
    parameter it holds that requires grad."""
    own = getattr(optimizer, "moving_params", None)
    if callable(own):
        return list(own())
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


class BackwardStep:
    """Mixin in front of a library optimizer: differentiate the closure, then run the library update.

    Written once so no registered first-order or sign optimizer re-implements the protocol (or the math). Under
    the `lean` precision the library update runs through ``unlearn.optim.rounding.LeanStep``.
    """

    grade: str = "first-order"
    uses_gradients = True
    _lean = None  # a LeanStep once round_updates() was called

    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        closure = require_closure(closure)
        # The loop may call step() under no_grad (e.g. inside an eval context); backward needs a graph.
        with torch.enable_grad():
            loss = backward(closure, self._own_params())
        if self._lean is None:
            super().step()  # type: ignore[misc]  # the library update reads the .grad just filled
        else:
            self._lean(self, super().step)  # type: ignore[misc]
        self.zero_grad(set_to_none=True)  # type: ignore[attr-defined]  # frees grads between steps
        return loss

    def round_updates(self, seed: int) -> None:
        self._lean = LeanStep(seed)

    def _own_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]  # type: ignore[attr-defined]


def trainable(params: Params) -> list[Any]:
    """Materialize ``params`` (generators are single-use) keeping only tensors that require grad; named
    pairs stay pairs so torch.optim records ``param_names``."""
    kept: list[Any] = []
    for item in params:
        p = item[1] if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) else item
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"optimizer params must be tensors or (name, tensor) pairs, got {type(p).__name__}")
        if p.requires_grad:
            kept.append(item)
    if not kept:
        raise ValueError("no trainable parameters (requires_grad=True) to optimize")
    return kept


class OptionError(ValueError):
    """A bad optimizer option, its message already naming the setting (`optimizer.fo.lr must be ...`): passed on
    as it is by the builders that wrap everything else."""


def check_options(name: str, options: dict[str, Any], section: str = "optimizer") -> type[torch.optim.Optimizer]:
    """The class registered as ``name``, after checking ``options`` against its ``Settings``; cheap, so callers
    can validate a config before spending minutes on anything else."""
    cls = OPTIMIZERS.lookup(name)
    try:
        from_mapping(cls.Settings, options, section, owner=f"optimizer '{name}'")
    except InvalidSettings as err:
        raise OptionError(str(err)) from None
    return cls


def _stand_in_params() -> list[tuple[str, torch.Tensor]]:
    """A few tiny tensors named like a decoder's (embeddings, attention and MLP matrices, a norm, the head), so
    that name-aware optimizers find what they look for."""
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
             "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
             "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
    params = [(n, torch.nn.Parameter(torch.zeros(4, 4))) for n in names]
    return [*params, ("model.layers.0.input_layernorm.weight", torch.nn.Parameter(torch.ones(4)))]


def dry_build(name: str, options: dict[str, Any]) -> None:
    """Build the optimizer on stand-in tensors: every check its constructor makes (ranges, choices, the
    sub-optimizers of a hybrid) runs now, in milliseconds, instead of after minutes of model loading."""
    try:
        build_optimizer(name, _stand_in_params(), **options)
    except ValueError as err:
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, ModelDependent):
                return
            cause = cause.__cause__
        raise


def build_optimizer(name: str, params: Params, section: str = "optimizer", **options: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over the trainable tensors in ``params``.

    Every user mistake (unknown name, unknown option, bad value) becomes a one-line ``ValueError``.
    """
    cls = check_options(name, options, section)
    try:
        return cls(trainable(params), **options)
    except OptionError:
        raise
    except (TypeError, ValueError) as err:  # e.g. lr given as the string "1e-5" by a YAML config
        raise OptionError(f"bad options for optimizer '{name}': {err}") from err

