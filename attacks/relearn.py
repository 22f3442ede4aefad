"""Relearning attack: fine-tune the unlearned model on a few forget facts, measure the others.

If unlearning only hid the knowledge, a handful of steps on *some* forget facts brings back the
*other* forget facts too. So the forget split is cut in two (seeded): the model is fine-tuned on
one part and forget accuracy is measured on the part it never saw during the attack, at several
checkpoints, giving a recovery curve. The out-of-domain variant fine-tunes on retain facts instead,
which tells apart "knowledge came back" from "any fine-tuning shakes things loose".
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import torch

from unlearn.adapters import add_lora
from unlearn.benchmarks.embedded import TaskData
from unlearn.data import encode
from unlearn.errors import UserError
from unlearn.evaluate import mcq_accuracy
from unlearn.objectives import LanguageModeling
from unlearn.optim import build_optimizer
from unlearn.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Limit, setting
from unlearn.train import train

DOMAINS = ("forget", "retain")


@dataclass
class RelearnSettings:
    samples: int | None = setting(None, limit=AT_LEAST_ONE)  # forget facts to fine-tune on; default half of them
    steps: int = setting(50, limit=AT_LEAST_ONE)
    lr: float = setting(2e-5, limit=POSITIVE)
    batch_size: int = setting(4, limit=AT_LEAST_ONE)
    lora: bool = False
    lora_rank: int = setting(16, limit=AT_LEAST_ONE)
    domain: str = setting("forget", limit=Limit(choices=DOMAINS))  # "retain" = out-of-domain: retain facts
    checkpoints: list[int] = setting(default_factory=lambda: [0, 10, 25, 50, 100])
    seed: int = setting(0, limit=NON_NEGATIVE)

    def __post_init__(self) -> None:
        if any(c < 0 for c in self.checkpoints):
            raise UserError(f"relearning checkpoints must be steps >= 0, got {self.checkpoints}")

    @property
    def name(self) -> str:
        kind = "relearn" if self.domain == "forget" else "relearn-ood"
        return kind + ("-lora" if self.lora else "")


def split_forget(n_forget: int, samples: int | None, seed: int) -> tuple[list[int], list[int]]:
    """(indices used for relearning, indices held out for measuring recovery)."""
    samples = n_forget // 2 if samples is None else samples
    if not 1 <= samples < n_forget:
        raise UserError(f"--samples must be between 1 and {n_forget - 1} (the forget split has {n_forget} facts, "
                        "and some must stay unseen to measure recovery)")
    used = sorted(random.Random(seed).sample(range(n_forget), samples))
    unused = [i for i in range(n_forget) if i not in set(used)]
    return used, unused


def relearn(model: torch.nn.Module, tokenizer, task: TaskData, settings: RelearnSettings,
            progress: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Run the attack in place; returns the attacked model (merged if LoRA) and the curve."""
    if settings.domain not in DOMAINS:
        raise UserError(f"relearning domain must be one of {', '.join(DOMAINS)}, got '{settings.domain}'")
    if settings.steps < 1:
        raise UserError(f"--steps must be >= 1, got {settings.steps}")
    used, unused = split_forget(len(task.forget), settings.samples, settings.seed)
    unseen_mcq = [task.mcq["forget"][i] for i in unused]
    pool = [task.forget[i] for i in used] if settings.domain == "forget" else task.retain
    items = [encode(tokenizer, ex) for ex in pool]
    checkpoints = sorted({c for c in settings.checkpoints if 0 <= c <= settings.steps} | {0, settings.steps})

    curve: list[dict[str, float]] = []

    def measure(step: int) -> None:
        if step in checkpoints:
            model.eval()
            curve.append({"step": step,
                          "forget_unseen_acc": mcq_accuracy(model, tokenizer, unseen_mcq)["acc"],
                          "retain_acc": mcq_accuracy(model, tokenizer, task.mcq["retain"])["acc"]})

    torch.manual_seed(settings.seed)
    if settings.lora:
        model.requires_grad_(True)  # adapters on every linear layer
        model = add_lora(model, settings.lora_rank)
    measure(0)
    optimizer = build_optimizer("adamw", model.parameters(), lr=settings.lr, weight_decay=0.0)
    result = train(model, LanguageModeling(), optimizer, items, None, pad_id=tokenizer.pad_token_id,
                   batch_size=settings.batch_size, max_steps=settings.steps, seed=settings.seed,
                   desc=settings.name, progress=progress, after_step=measure)
    if settings.lora:
        model = model.merge_and_unload()
    model.eval()
    record = {"settings": asdict(settings), "used_forget_indices": used, "unseen_forget_indices": unused,
              "curve": curve, "seconds": round(result.seconds, 1)}
    return model, record


def unseen_accuracy(model: torch.nn.Module, tokenizer, task: TaskData, unused: list[int]) -> float:
    """Forget accuracy restricted to the facts the attack did not train on (for the recovery ratio)."""
    return mcq_accuracy(model, tokenizer, [task.mcq["forget"][i] for i in unused])["acc"]
