"""Membership inference scores: how well a model's behaviour on an item tells whether it was trained on it.

Six scores, each written from its paper and signed as OpenUnlearning signs them: higher = less likely a member
(the AUC is then that of telling non-members, label 1, from members, label 0; 1 = members fully detected, 0.5 =
no signal). All are computed on an item's target tokens (a QA pair's answer and its EOS, or a whole passage):
- loss: the mean token NLL (Yeom et al., 2018);
- zlib: that NLL divided by the zlib-compressed size in bytes of the target text (Carlini et al., 2021);
- min_k: minus the mean of the lowest max(1, floor(k·n)) token log-probabilities (Shi et al., 2024, Min-K% Prob);
- min_k_plus_plus: the same over z_t = (log p(x_t) − μ_t) / σ_t, with μ_t and σ_t² the mean and variance of log p
  under the model's own next-token distribution, σ_t² floored at 1e-6 (Zhang et al., 2024, Min-K%++);
- gradnorm: the mean over parameter tensors of the p-norm of the gradient of the item's mean NLL (Wang et al.,
  2024);
- reference: the item's mean NLL minus a reference model's (Carlini et al., 2022's likelihood ratio, as a loss
  difference).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unlearn.evaluation.measures import progress_bar, run_batches
from unlearn.tasks.data import Encoded, Example, collate, encode, on_device
from unlearn.tasks.scoring import mean_token_nll, split_head

VARIANCE_FLOOR = 1e-6  # Min-K%++: σ² below this is taken as this (a near-deterministic next-token distribution)
POSITIONS_PER_SLICE = 256  # vocabulary-wide log-softmax of at most this many positions at once


@dataclass
class TokenStats:
    """Per target token of one item: log p(x_t), and μ_t, σ_t² of log p under the model's next-token distribution."""

    logprobs: torch.Tensor
    mu: torch.Tensor
    variance: torch.Tensor
    text: str  # the target tokens decoded (special tokens dropped): what zlib compresses


def encoded(tokenizer: Any, items: Sequence[Example], max_length: int | None) -> list[Encoded]:
    """The items as scored: a QA pair's prompt then its answer and EOS (what training sees); a passage (no prompt)
    as it is, without EOS."""
    limit = max_length or 1 << 30
    return [encode(tokenizer, ex, add_eos=bool(ex.prompt), max_length=limit) for ex in items]


@torch.no_grad()
def token_stats(model: Any, tokenizer: Any, items: Sequence[Encoded], batch_size: int,
                max_batch_tokens: int | None = None) -> list[TokenStats]:
    """One forward per batch; the head and the vocabulary-wide softmax run on a slice of target positions at a time,
    so a long passage of a large-vocabulary model never holds a full float32 logits tensor."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    split = split_head(model)

    def score(batch: dict[str, torch.Tensor], indices: list[int]) -> list[TokenStats]:
        batch = on_device(model, batch)
        labels = batch["labels"][:, 1:]
        rows, cols = (labels != -100).nonzero(as_tuple=True)  # position t-1 predicts target token t
        if split is None:
            per_position = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1]
            pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda r, c: per_position[r, c]  # noqa: E731
        else:
            decoder, head = split
            hidden = decoder(input_ids=batch["input_ids"], use_cache=False).last_hidden_state[:, :-1]
            pick = lambda r, c: head(hidden[r, c])  # noqa: E731
        lp, mu, var = [], [], []
        for start in range(0, len(rows), POSITIONS_PER_SLICE):
            r, c = rows[start:start + POSITIONS_PER_SLICE], cols[start:start + POSITIONS_PER_SLICE]
            log_p = torch.log_softmax(pick(r, c).float(), dim=-1)
            p = log_p.exp()
            m = (p * log_p).sum(-1)
            lp.append(log_p.gather(1, labels[r, c][:, None])[:, 0].double())
            mu.append(m.double())
            var.append(((p * log_p.square()).sum(-1) - m.square()).double())
        lp_all, mu_all, var_all = (torch.cat(x).cpu() if x else torch.zeros(0, dtype=torch.float64)
                                   for x in (lp, mu, var))
        out = []
        rows_cpu = rows.cpu()
        for row, index in enumerate(indices):
            mine = rows_cpu == row
            target = items[index].input_ids[items[index].n_prompt:]
            out.append(TokenStats(lp_all[mine], mu_all[mine], var_all[mine],
                                  tokenizer.decode(target, skip_special_tokens=True)))
        return out

    return run_batches(items, batch_size, max_batch_tokens, pad, score)


def grad_norms(model: Any, tokenizer: Any, items: Sequence[Encoded], p: float = 2.0) -> list[float]:
    """Per item: the mean over parameter tensors of ‖∇θ mean NLL‖_p, one backward per item (GradNorm). The model's
    own gradients are left as they were found (none)."""
    params = [q for q in model.parameters() if q.requires_grad]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()  # no dropout: the score must not depend on a random mask
    out = []
    try:
        with progress_bar(len(items)) as bar:
            for item in items:
                batch = on_device(model, collate([item], pad))
                model.zero_grad(set_to_none=True)
                mean_token_nll(model, batch).backward()
                norms = [q.grad.detach().float().norm(p=p) for q in params if q.grad is not None]
                out.append(float(torch.stack(norms).mean()) if norms else math.nan)
                bar.update(1)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------- scores


def loss_score(stats: TokenStats) -> float:
    return float(-stats.logprobs.mean())


def zlib_score(stats: TokenStats) -> float:
    return loss_score(stats) / len(zlib.compress(stats.text.encode("utf-8")))


def min_k_count(n: int, k: float) -> int:
    return max(1, int(n * k))


def min_k_score(stats: TokenStats, k: float) -> float:
    values = stats.logprobs.sort().values
    return float(-values[:min_k_count(values.numel(), k)].mean())


def min_k_plus_plus_score(stats: TokenStats, k: float) -> float:
    z = (stats.logprobs - stats.mu) / stats.variance.clamp(min=VARIANCE_FLOOR).sqrt()
    values = z.sort().values
    return float(-values[:min_k_count(values.numel(), k)].mean())


def reference_score(stats: TokenStats, reference: TokenStats) -> float:
    return loss_score(stats) - loss_score(reference)
