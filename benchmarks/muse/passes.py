"""The model passes MUSE's PrivLeak needs: token log-probabilities of whole passages, Min-K% scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from unlearn.benchmarks.muse.metrics import min_k_count, min_k_score
from unlearn.core.errors import UserError
from unlearn.evaluation.measures import (
    model_context,
    run_batches,
)
from unlearn.tasks.data import Encoded
from unlearn.tasks.scoring import shifted_logprobs


@dataclass
class Scored:
    """One passage's token log-probabilities and whether it was cut to fit."""

    logprobs: torch.Tensor
    n_tokens: int  # tokens of the whole passage as tokenized
    truncated: bool


@torch.no_grad()
def token_logprobs(model: Any, tokenizer: Any, texts: list[str], max_tokens: int | None, batch_size: int,
                   max_batch_tokens: int | None = None) -> list[Scored]:
    """log p(x_t | x_<t) for tokens 2..n of each text, tokenized as MUSE does (`tokenizer.encode`: special
    tokens included), whole unless longer than `max_tokens` or the model's context (then cut and marked).
    Batched longest first; logits are computed a slice of positions at a time so a long passage of a
    large-vocabulary model never holds a full float32 logits tensor."""
    limits = [v for v in (max_tokens, model_context(model)) if v is not None]
    limit = min(limits) if limits else None
    full = [tokenizer(t, add_special_tokens=True).input_ids for t in texts]
    ids = [row[:limit] if limit else row for row in full]
    for index, row in enumerate(ids):
        if len(row) < 2:
            raise UserError(f"privleak text {index + 1} has fewer than 2 tokens: Min-K% has nothing to score")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def score(batch: dict[str, torch.Tensor], indices: list[int]) -> list[torch.Tensor]:
        # Right padding needs no attention mask in a causal model (see unlearn/tasks/scoring.py: _logits_at).
        lp = shifted_logprobs(model, batch["input_ids"].to(model.device))
        return [lp[row, :len(ids[i]) - 1].cpu() for row, i in enumerate(indices)]

    logprobs = run_batches([Encoded(input_ids=row, n_prompt=0) for row in ids], batch_size, max_batch_tokens,
                           pad, score)
    return [Scored(lp, len(f), len(i) < len(f)) for lp, f, i in zip(logprobs, full, ids, strict=True)]


def min_k_scores(model: Any, tokenizer: Any, texts: list[str], k_percent: float, max_tokens: int | None,
                 batch_size: int, max_batch_tokens: int | None = None) -> tuple[list[float], list[Scored]]:
    scored = token_logprobs(model, tokenizer, texts, max_tokens, batch_size, max_batch_tokens)
    scores = []
    for index, item in enumerate(scored):
        if min_k_count(item.logprobs.numel(), k_percent) < 1:
            raise UserError(f"privleak text {index + 1} has {item.logprobs.numel() + 1} tokens: Min-{k_percent:g}% "
                            "(MUSE's floor(n·K/100)) selects none of them")
        scores.append(min_k_score(item.logprobs, k_percent))
    return scores, scored
