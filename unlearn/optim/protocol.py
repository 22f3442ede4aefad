"""The closure protocol shared by every optimizer grade, the registry, and ``build_optimizer``.

The training loop calls ``opt.step(closure)`` whatever the grade: the closure only *evaluates* the loss
(it never calls ``backward``), so each optimizer decides how often to evaluate it and whether to
differentiate it. That is what lets first-order, sign, second-order, spectral, zeroth-order and hybrid
optimizers share one loop.

The closure returns either a scalar tensor or a ``Loss``: the objective's named, already weighted parts
(``forget``, ``retain``) whose sum is the optimized loss. Most optimizers only read ``total_loss(...)``;
conflict-aware ones (SIFT) differentiate the parts separately. Parameters may be given as tensors or as
``(name, tensor)`` pairs (``model.named_parameters()``), as torch.optim accepts; name-aware optimizers
(Muon, SIFT) use the names to tell hidden matrices from embeddings and to select matrices by pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch

from unlearn.loss import LossValue, total_loss
from unlearn.registry import Registry
from unlearn.settings import SettingError, check_call_options

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


@runtime_checkable
class Diagnosing(Protocol):
    """An optimizer with per-step counters worth logging (SIFT's conflict counts): log.jsonl records them."""

    def diagnostics(self) -> dict[str, float]: ...


@runtime_checkable
class Scheduled(Protocol):
    """An optimizer that delegates each step to another grade (hybrid): log.jsonl records which one ran."""

    last_grade: str | None


def _declares_grade(name: str, cls: type) -> None:
    grade, gradients = getattr(cls, "grade", None), getattr(cls, "uses_gradients", None)
    if grade not in GRADES or not isinstance(gradients, bool):
        raise TypeError(f"optimizer '{name}' must declare grade (one of {', '.join(GRADES)}) and uses_gradients "
                        f"(got {grade!r}, {gradients!r})")


OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry("optimizer", check=_declares_grade)
register = OPTIMIZERS.register  # class decorator: make the optimizer buildable by name


class ModelDependent(ValueError):
    """Options that are fine in themselves but select nothing in *this* model (a name pattern, say): only the
    real build can tell, so ``dry_build`` lets it pass."""


def require_closure(closure: Closure | None) -> Closure:
    if closure is None:
        raise ValueError("step() needs a closure that returns the loss tensor (without calling backward)")
    return closure


class BackwardStep:
    """Mixin in front of a library optimizer: differentiate the closure, then run the library update.

    Written once so no registered first-order or sign optimizer re-implements the protocol (or the math).
    """

    grade: str = "first-order"
    uses_gradients = True

    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        closure = require_closure(closure)
        # The loop may call step() under no_grad (e.g. inside an eval context); backward needs a graph.
        with torch.enable_grad():
            loss = total_loss(closure())
            loss.backward()
        super().step()  # type: ignore[misc]  # the library update reads the .grad just filled
        self.zero_grad(set_to_none=True)  # type: ignore[attr-defined]  # frees grads between steps
        return loss.detach().float()


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
    """The class registered as ``name``, after checking ``options`` against its constructor; cheap, so
    callers can validate a config before spending minutes on anything else."""
    cls = OPTIMIZERS.lookup(name)
    # Checked against the signature (names and annotated types) rather than left to the constructor: some
    # library optimizers take **kwargs and would silently ignore a misspelled option.
    try:
        check_call_options(cls.__init__, options, section, owner=f"optimizer '{name}'")
    except SettingError as err:
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

