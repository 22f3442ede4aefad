"""Preference-style methods: NPO and SimNPO (the forget answer as a rejected response), and IdkDPO (a refusal
preferred over the forget answer)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from unlearn.core.settings import NON_NEGATIVE, POSITIVE, setting
from unlearn.optim.loss import Loss
from unlearn.tasks.data import Encoded, Example, encode, variant
from unlearn.tasks.scoring import mean_token_nll, sequence_logprobs
from unlearn.training.methods.base import METHODS, WEIGHT, Batch, Method, reference_logprobs


@METHODS.register("npo")
class NPO(Method):
    """Negative preference optimization: the forget answer as a rejected response, plus the retain NLL.

    With summed sequence log-probs:
    L_f = -(2/beta) * E_f[log sigmoid(-beta * (log pi(y|x) - log pi_ref(y|x)))];
    total = gamma * L_f + alpha * NLL(retain)."""

    @dataclass(frozen=True)
    class Settings:
        beta: float = setting(0.1, limit=POSITIVE)  # L_f divides by beta
        gamma: float = setting(1.0, limit=WEIGHT)
        alpha: float = setting(2.0, limit=WEIGHT)

    def prepare(self, model, forget, retain, pad_id, batch_size, retain_used=None):
        for item, logp in zip(forget, reference_logprobs(model, forget, pad_id, batch_size), strict=True):
            item.extra["ref_logp"] = logp

    def forget_loss(self, model, forget: Batch) -> torch.Tensor:
        if "ref_logp" not in forget:
            raise RuntimeError("NPO.prepare() must run before training (reference log-probs missing)")
        logp, _ = sequence_logprobs(model, forget)
        ratio = logp - forget["ref_logp"].to(logp.device)
        beta = self.settings.beta
        return -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()

    def __call__(self, model, forget, retain):
        s = self.settings
        return Loss({"forget": s.gamma * self.forget_loss(model, forget),
                     "retain": s.alpha * mean_token_nll(model, retain)})


@METHODS.register("simnpo")
class SimNPO(Method):
    """Reference-free NPO with length normalization, plus the retain NLL.

    L_f = -(2/beta) * E_f[log sigmoid(-(beta/|y|) * log pi(y|x) - delta)]; total adds alpha * NLL(retain)."""

    @dataclass(frozen=True)
    class Settings:
        beta: float = setting(2.5, limit=POSITIVE)
        delta: float = 0.0
        gamma: float = setting(1.0, limit=WEIGHT)
        alpha: float = setting(1.0, limit=WEIGHT)

    def __call__(self, model, forget, retain):
        s = self.settings
        logp, n_tokens = sequence_logprobs(model, forget)
        margin = -(s.beta / n_tokens.clamp(min=1)) * logp - s.delta
        forget_loss = -(2.0 / s.beta) * F.logsigmoid(margin).mean()
        return Loss({"forget": s.gamma * forget_loss, "retain": s.alpha * mean_token_nll(model, retain)})


# Refusals IdkDPO prefers over the forget answer, one drawn per forget item (our own wording; TOFU ships a list of
# its own for the same purpose).
IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure about that.",
    "I don't have that information.",
    "I can't answer that.",
    "That is something I don't know.",
    "I have no idea.",
    "I'm unable to answer that question.",
    "I don't know the answer to that.",
    "Sorry, I don't know.",
    "I'm afraid I can't help with that.",
    "I have no knowledge of that.",
    "That's not something I can answer.",
    "I really don't know.",
    "I can't say.",
    "I'm not able to tell you that.",
    "I don't remember anything about that.",
)


@METHODS.register("idkdpo", "idk-dpo")
class IdkDPO(Method):
    """DPO preferring a refusal ("I don't know.") over the forget answer, plus the retain NLL.

    L_f = -(2/beta) * E_f[log sigmoid(beta * ((log pi(y_idk|x) - log pi_ref(y_idk|x))
                                             - (log pi(y_f|x) - log pi_ref(y_f|x))))],
    total = gamma * L_f + alpha * NLL(retain), with summed sequence log-probs and pi_ref the starting model.

    The 2/beta scale is OpenUnlearning's (the NPO paper's DPO baseline scales by 1/beta); defaults are
    OpenUnlearning's IdkDPO (beta 0.1, gamma 1, alpha 1). Each forget item's refusal is drawn from
    IDK_ANSWERS with `seed`, the same for an item whatever the batch."""

    @dataclass(frozen=True)
    class Settings:
        beta: float = setting(0.1, limit=POSITIVE)  # L_f divides by beta
        gamma: float = setting(1.0, limit=WEIGHT)
        alpha: float = setting(1.0, limit=WEIGHT)
        seed: int = setting(0, limit=NON_NEGATIVE)

    def encode_forget(self, tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[Encoded]:
        rng = random.Random(self.settings.seed)
        items = []
        for example in examples:
            refusal = replace(example, target=rng.choice(IDK_ANSWERS), extra={})
            item = encode(tokenizer, example, max_length=max_length)
            item.variants["idk"] = encode(tokenizer, refusal, max_length=max_length)
            items.append(item)
        return items

    def prepare(self, model, forget, retain, pad_id, batch_size, retain_used=None):
        if any("idk" not in item.variants for item in forget):
            raise RuntimeError("IdkDPO's forget items must come from its encode_forget (no refusal attached)")
        rejected = reference_logprobs(model, forget, pad_id, batch_size)
        preferred = reference_logprobs(model, [item.variants["idk"] for item in forget], pad_id, batch_size)
        for item, logp, idk_logp in zip(forget, rejected, preferred, strict=True):
            item.extra["ref_logp"] = logp
            item.extra["ref_logp_idk"] = idk_logp

    def forget_loss(self, model, forget: Batch) -> Any:
        if "ref_logp_idk" not in forget:
            raise RuntimeError("IdkDPO.prepare() must run before training (reference log-probs missing)")
        lose, _ = sequence_logprobs(model, forget)
        win, _ = sequence_logprobs(model, variant(forget, "idk"))
        margin = (win - forget["ref_logp_idk"].to(win.device)) - (lose - forget["ref_logp"].to(lose.device))
        beta = self.settings.beta
        return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()

    def __call__(self, model, forget, retain):
        s = self.settings
        return Loss({"forget": s.gamma * self.forget_loss(model, forget),
                     "retain": s.alpha * mean_token_nll(model, retain)})
