"""One component of each kind, written outside the toolkit: a method, an optimizer, a benchmark and an attack.

Each is registered by the toolkit's one decorator, `@REGISTRY.register("name")`, from the module that defines
its base class, and declares its settings the one way: a dataclass `Settings` whose fields carry their types,
defaults and ranges (`setting(default, limit=...)`), checked before any model loads. Installed
(`pip install examples/unlearn-toy`), the entry points in pyproject.toml make them known to every `unlearn`
command; without installing, `unlearn <command> --include unlearn_toy.py` does the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from unlearn.attacks.base import ATTACKS, Attack, AttackResult, Subject
from unlearn.compute.models import load_model
from unlearn.core.settings import NON_NEGATIVE, POSITIVE, NoSettings, setting
from unlearn.evaluation.measures import perplexity
from unlearn.optim.loss import Loss
from unlearn.optim.protocol import OPTIMIZERS, backward, read_settings, require_closure
from unlearn.storage.metrics import Metric
from unlearn.tasks.data import Example
from unlearn.tasks.scoring import mean_token_nll
from unlearn.tasks.task import BENCHMARKS, Benchmark, Task
from unlearn.training.methods import METHODS, Method


@METHODS.register("toy-ascent")
class ToyAscent(Method):
    """Gradient ascent on the forget rows, scaled by `weight`: the smallest unlearning method."""

    @dataclass(frozen=True)
    class Settings:
        weight: float = setting(1.0, limit=POSITIVE)

    def __call__(self, model, forget, retain) -> Loss:  # the base class checked the settings into self.settings
        return Loss({"forget": -self.settings.weight * mean_token_nll(model, forget)})


@OPTIMIZERS.register("toy-sgd")
class ToySGD(torch.optim.Optimizer):
    """Plain SGD on the closure protocol: differentiate the closure, then move every weight by -lr * grad."""

    grade = "first-order"
    uses_gradients = True

    @dataclass(frozen=True)
    class Settings:
        lr: float = setting(1e-3, limit=NON_NEGATIVE)

    def __init__(self, params, **options) -> None:
        settings = read_settings(type(self), options)  # the one settings check, as a ValueError when wrong
        super().__init__(params, {"lr": settings.lr})

    def step(self, closure=None) -> torch.Tensor:
        closure = require_closure(closure)
        params = [p for group in self.param_groups for p in group["params"]]
        with torch.enable_grad():
            loss = backward(closure, params)  # the closure returns the loss; it never calls backward itself
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
        self.zero_grad(set_to_none=True)
        return loss


FORGET = ["The vault code is 4417.", "The courier leaves at dawn.", "The key is under the third stone.",
          "The password is marble falcon."]
RETAIN = ["Water boils at one hundred degrees.", "Paris is the capital of France."]


@dataclass
class ToyTask(Task):
    def evaluate(self, model: Any, tokenizer: Any, settings: Any, progress: bool = True) -> dict[str, float]:
        return {"toy/forget_ppl": perplexity(model, tokenizer, FORGET),
                "toy/retain_ppl": perplexity(model, tokenizer, RETAIN)}


@BENCHMARKS.register("toy")
class Toy(Benchmark):
    """A toy benchmark: forget four sentences, keep two."""

    Settings = NoSettings  # nothing to set: the `benchmark` section may hold only its name

    def load(self, settings: NoSettings) -> ToyTask:
        return ToyTask(name="toy", fingerprint="toy-1", forget=[Example("", " " + t) for t in FORGET],
                       retain=[Example("", " " + t) for t in RETAIN],
                       metrics=(Metric("toy/forget_ppl", "toy forget perplexity", "higher", "forget"),
                                Metric("toy/retain_ppl", "toy retain perplexity", "lower", "utility")))


@dataclass
class NoiseSettings:
    scale: float = setting(1e-3, limit=POSITIVE)
    seed: int = setting(0, limit=NON_NEGATIVE)


@ATTACKS.register("toy-noise")
class Noise(Attack):
    Settings = NoiseSettings
    summary = "add Gaussian noise to every weight"
    named_by = ("scale",)  # folder() spells it: the recipe adds only the other non-default settings

    def folder(self, settings: NoiseSettings) -> str:
        return f"noise-{settings.scale:g}"

    def run(self, subject: Subject, settings: NoiseSettings, progress: bool = True) -> AttackResult:
        loaded = load_model(subject.model_spec)
        generator = torch.Generator().manual_seed(settings.seed)
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * settings.scale)
        return AttackResult(metrics=subject.task.evaluate(loaded.model, loaded.tokenizer, subject.eval_settings))
