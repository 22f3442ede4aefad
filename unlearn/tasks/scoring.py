"""Log-probabilities of target tokens, the quantity every method and metric is built on.

Only the positions that predict a target token go through the output head: with a 49k vocabulary
the head is a large share of a small model's compute, and prompts are most of each sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearn.tasks.data import IGNORE

# Elements of one float32 logits block in `shifted_logprobs`: bounds memory for large vocabularies and long texts.
LOGIT_BUDGET = 2**27


def _sharded(model) -> bool:
    import torch.distributed.fsdp as fsdp

    return isinstance(model, fsdp.FSDPModule)


def split_head(model):
    """(decoder, head) when the model's logits are simply head(hidden), so the head can be applied to chosen
    positions only; None for models whose logits are more than that (e.g. soft-capped)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        return None
    if _sharded(model):  # FSDP gathers the head's weights only inside the whole model's forward
        return None
    return decoder, head


def _logits_at(model, batch: dict[str, torch.Tensor], select, padding_mask: bool = True) -> torch.Tensor:
    """Logits at the positions `select(per-position tensor)` picks, computing the head only there when the
    model's logits are simply head(hidden); other models (e.g. soft-capped logits) take the plain path.

    `padding_mask=False` leaves the attention mask out. Batches are right-padded, and in a causal model no real
    token attends to the padding after it, so every position that is read is computed exactly as with the
    mask; without one the model takes its plain causal attention kernel, which is faster (lm-eval-harness
    scores the same way)."""
    mask = batch["attention_mask"] if padding_mask else None
    split = split_head(model)
    if split is None:
        return select(model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits)
    decoder, head = split
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
    return head(select(hidden))


def shifted_logprobs(model, input_ids: torch.Tensor, max_logits: int = LOGIT_BUDGET) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) at every position t, [rows, width - 1], for right-padded
    rows (no mask needed: see `_logits_at`). The head runs on a slice of positions at a time, so a long passage
    of a large-vocabulary model never holds a full float32 logits tensor (at most `max_logits` elements)."""
    targets = input_ids[:, 1:]
    split = split_head(model)
    if split is None:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
        return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    decoder, head = split
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    step = max(1, max_logits // (int(head.weight.shape[0]) * input_ids.shape[0]))
    parts = [-F.cross_entropy(head(hidden[:, s:s + step]).float().transpose(1, 2), targets[:, s:s + step],
                              reduction="none") for s in range(0, hidden.shape[1], step)]
    return torch.cat(parts, dim=1)


def _head_inputs(model, batch: dict[str, torch.Tensor],
                 padding_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at positions that predict a label, the labels, and each one's row index."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    logits = _logits_at(model, batch, lambda per_position: per_position[:, :-1][keep], padding_mask)
    return logits, labels[keep], keep.nonzero()[:, 0]


def target_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits at every position that predicts a target token, [targets, vocab], in row-major order: the
    distributions the target NLL reads (a KL term to a reference model compares them)."""
    return _head_inputs(model, batch)[0]


def next_token_logprobs(model, batch: dict[str, torch.Tensor], padding_mask: bool = True) -> torch.Tensor:
    """log p(next token | row) over the vocabulary, after each (right-padded) row's last real token."""
    rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    last = batch["attention_mask"].sum(dim=1) - 1
    logits = _logits_at(model, batch, lambda per_position: per_position[rows, last], padding_mask)
    return torch.log_softmax(logits.float(), dim=-1)


def sequence_logprobs(model, batch: dict[str, torch.Tensor],
                      padding_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's target tokens, and each row's number of target tokens."""
    logits, labels, rows = _head_inputs(model, batch, padding_mask)
    token_lp = -F.cross_entropy(logits.float(), labels, reduction="none")
    n_rows = batch["input_ids"].shape[0]
    summed = torch.zeros(n_rows, dtype=token_lp.dtype, device=token_lp.device).index_add(0, rows, token_lp)
    counts = torch.bincount(rows, minlength=n_rows)
    return summed, counts


def mean_token_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Average NLL over all target tokens in the batch (the usual LM loss)."""
    logits, labels, _ = _head_inputs(model, batch)
    return F.cross_entropy(logits.float(), labels)
