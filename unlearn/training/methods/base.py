"""The method protocol, its registry, and the fine-tuning loss the attacks and benchmark preparation share.

A method is a small loss function of (model, forget batch, retain batch). Methods never call backward on the loss
they return: the optimizer decides whether to differentiate it (first-order) or only evaluate it (zeroth-order).
Anything that depends on the model *before* unlearning (reference log-probs, frozen activations, the starting
weights) is computed once in `prepare`.

Beside its loss, a method declares what it needs from a run, so the run's settings are checked before any model
loads (unlearn.recipes.pipeline), and it may hook three points of the run: how its forget items are encoded
(a preferred answer beside each, IdkDPO), the start of every step (a per-step noise draw, RS-NPO), and the end
of training (a weight edit, the task vector).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, ClassVar

import torch

from unlearn.core.registry import Registry
from unlearn.core.settings import NON_NEGATIVE, NoSettings, declares_settings, from_mapping
from unlearn.optim.loss import Loss
from unlearn.tasks.data import Encoded, Example, encode, fixed_batches, on_device
from unlearn.tasks.scoring import mean_token_nll, sequence_logprobs

Batch = dict[str, torch.Tensor]
METHODS: Registry[type[Method]] = Registry("method", check=declares_settings("method"),
                                           members="unlearn.training.methods")


# Loss weights scale a part of the method; a negative one would turn forgetting into learning.
WEIGHT = NON_NEGATIVE


class Method:
    """Base: all parameters train and nothing is precomputed. A method's settings are its `Settings` dataclass
    (typed fields with defaults and ranges); the constructor takes them as keywords and checks them."""

    Settings: type = NoSettings

    # What the method needs from a run (checked before any model loads):
    # - its loss differentiates the model itself (SAM's ascent step): an optimizer that computes no gradients
    #   (zeroth-order) cannot run it;
    needs_gradients: ClassVar[bool] = False
    # - its loss is evaluated at shifted weights (SAM, RS): gradient checkpointing would recompute the forward in
    #   backward after the shift is gone, and FSDP's parameters are shards, so both are refused;
    shifts_weights: ClassVar[bool] = False
    # - `finish` transforms the trained weights (the task vector): the live probe during training measures the
    #   model before that edit, so a stop rule on it (train.stop_at) would stop at the wrong model.
    edits_after_training: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.settings = from_mapping(self.Settings, options, "method", owner=f"method {type(self).__name__}")

    @property
    def passes_per_loss(self) -> int:
        """Passes over the forget batch one evaluation of the loss costs: what `forwards` in log.jsonl and a study's
        cost column count per evaluation, so a method that evaluates its forget term several times (SAM's ascent
        point, RS's draws) is not shown as cheap as one that evaluates it once."""
        return 1

    @property
    def copies_model(self) -> bool:
        """Whether `prepare` keeps a frozen copy of the whole model on its device (FSDP cannot shard it)."""
        return False

    def trainable(self, model: torch.nn.Module) -> None:
        """Set requires_grad on the parameters this method updates (default: leave as is)."""

    def encode_forget(self, tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[Encoded]:
        """The forget examples as training items (a method may attach variants of each: IdkDPO's preferred
        answer)."""
        return [encode(tokenizer, ex, max_length=max_length) for ex in examples]

    def prepare(self, model: torch.nn.Module, forget: list[Encoded], retain: list[Encoded],
                pad_id: int, batch_size: int, retain_used: Collection[int] | None = None) -> None:
        """Precompute whatever depends on the model before unlearning (stored in `Encoded.extra`).
        `retain_used`: the indices of the retain items training will draw (None: any of them)."""

    def begin_step(self, step: int) -> None:
        """Called before 1-based training step `step` (and never during it): every evaluation of that step's loss
        then sees the same per-step draws, as a zeroth-order difference of two evaluations needs."""

    def finish(self, model: torch.nn.Module) -> None:
        """Called once after the last training step, on the plain (LoRA-merged) model."""

    def __call__(self, model: torch.nn.Module, forget: Batch, retain: Batch) -> Loss:
        """The loss as named, weighted parts (``forget``, ``retain``) summing to the optimized loss."""
        raise NotImplementedError


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, items: list[Encoded], pad_id: int, batch_size: int) -> list[float]:
    """Each item's summed target log-prob under `model` as it is now (the reference of preference methods)."""
    out: list[float] = []
    for batch in fixed_batches(items, batch_size, pad_id):
        out.extend(sequence_logprobs(model, on_device(model, batch))[0].tolist())
    return out


def build_method(name: str, **options: Any) -> Method:
    """The method registered as `name`; a one-line ValueError for an unknown name, option, type or range."""
    cls = METHODS.lookup(name)
    from_mapping(cls.Settings, options, "method", owner=f"method '{name}'")  # named as the config names it
    return cls(**options)


class LanguageModeling(Method):
    """Plain fine-tuning on the first stream (NLL of its targets). Not an unlearning method, so
    it is not registered: benchmark preparation and relearning attacks use it directly."""

    def __call__(self, model, forget, retain):
        return Loss({"finetune": mean_token_nll(model, forget)})
