"""Representation methods: RMU steers the forget text's hidden states at one layer toward a random direction."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unlearn.core.settings import NON_NEGATIVE, POSITIVE, setting
from unlearn.optim.loss import Loss
from unlearn.tasks.data import fixed_batches, on_device
from unlearn.training.methods.base import METHODS, WEIGHT, Batch, Method


class _StopForward(Exception):
    """Raised by a hook once the probed layer has run: later layers would be wasted compute."""


def _decoder_layers(model) -> Sequence[torch.nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError("RMU needs a decoder with a `.layers` list (Llama/Mistral/Qwen-style models)")
    return layers


def layer_activations(model, batch: Batch, layer: int) -> torch.Tensor:
    """Output hidden states of decoder layer `layer` (0-based), stopping the forward right there."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = _decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


@METHODS.register("rmu")
class RMU(Method):
    """Representation misdirection: steer forget activations toward a random direction at one layer.

    Forget activations at layer l go toward a fixed random vector c*u; retain activations stay where the frozen
    model had them. Only mlp.down_proj of layers l-2..l train (as published).

    `layer` defaults to the published layer 7 of 32, rescaled to the model's depth. `steering`
    (c) defaults to `steering_scale` times the mean activation norm at that layer on the forget
    set: the published c = 6.5..20 was tuned for a 7B model whose activation norms differ.

    The retain term needs the frozen model's activations at layer l. They are cached for the retain items the
    run will draw (not the whole corpus: at 7B and 512 tokens that is 8 MB per item), in the model's dtype and
    in CPU memory; `frozen_copy: true` instead keeps a frozen copy of the model (its weights again, on its
    device) and computes them on the fly, for runs that draw more retain text than memory can cache."""

    @dataclass(frozen=True)
    class Settings:
        layer: int | None = setting(None, limit=NON_NEGATIVE)
        steering: float | None = setting(None, limit=POSITIVE)
        steering_scale: float = setting(4.0, limit=POSITIVE)
        alpha: float = setting(100.0, limit=WEIGHT)
        seed: int = setting(0, limit=NON_NEGATIVE)
        frozen_copy: bool = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.steering = self.settings.steering  # c: measured in prepare() when not given
        self.control: torch.Tensor | None = None
        self.frozen: dict[int, torch.Tensor] = {}
        self.frozen_model: torch.nn.Module | None = None

    @property
    def copies_model(self) -> bool:
        return self.settings.frozen_copy

    def _layer(self, model) -> int:
        depth = len(_decoder_layers(model))
        layer = round(7 * depth / 32) if self.settings.layer is None else self.settings.layer
        if not 2 <= layer < depth:
            raise ValueError(f"rmu layer must be in [2, {depth - 1}] for this model, got {layer}")
        return layer

    def trainable(self, model):
        layer = self._layer(model)
        wanted = {id(p) for i in range(layer - 2, layer + 1)
                  for p in _decoder_layers(model)[i].mlp.down_proj.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)

    @torch.no_grad()
    def prepare(self, model, forget, retain, pad_id, batch_size, retain_used=None):
        layer = self._layer(model)
        hidden = model.config.hidden_size
        gen = torch.Generator().manual_seed(self.settings.seed)
        direction = torch.rand(hidden, generator=gen)
        direction = direction / direction.norm()
        if self.steering is None:
            batches = [on_device(model, b) for b in fixed_batches(forget, batch_size, pad_id)]
            norms = [(layer_activations(model, b, layer).norm(dim=-1) * b["attention_mask"]).sum()
                     / b["attention_mask"].sum() for b in batches]
            self.steering = self.settings.steering_scale * float(torch.stack(norms).mean())
        self.control = self.steering * direction
        self.frozen, self.frozen_model = {}, None
        if self.settings.frozen_copy:
            self.frozen_model = copy.deepcopy(model).requires_grad_(False).eval()
            return
        for index, item in enumerate(retain):
            item.extra["index"] = float(index)
        used = sorted(range(len(retain)) if retain_used is None else set(retain_used))
        for start in range(0, len(used), batch_size):
            indices = used[start:start + batch_size]
            batch = on_device(model, fixed_batches([retain[i] for i in indices], batch_size, pad_id)[0])
            acts = layer_activations(model, batch, layer)
            for i, a, m in zip(indices, acts, batch["attention_mask"], strict=True):
                self.frozen[i] = a[m.bool()].to("cpu", copy=True)

    def __call__(self, model, forget, retain):
        if self.control is None:
            raise RuntimeError("RMU.prepare() must run before training")
        layer = self._layer(model)
        f_act = layer_activations(model, forget, layer)
        f_mask = forget["attention_mask"].bool()
        forget_loss = ((f_act[f_mask] - self.control.to(f_act)) ** 2).mean()
        r_act = layer_activations(model, retain, layer)
        r_mask = retain["attention_mask"].bool()
        if self.frozen_model is not None:
            with torch.no_grad():
                target = layer_activations(self.frozen_model, retain, layer)[r_mask].to(r_act)
        else:
            target = torch.cat([self.frozen[int(i)] for i in retain["index"].tolist()]).to(r_act)
        retain_loss = ((r_act[r_mask] - target) ** 2).mean()
        return Loss({"forget": forget_loss, "retain": self.settings.alpha * retain_loss})
