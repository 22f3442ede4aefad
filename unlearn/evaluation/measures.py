"""Metrics: each a small function of (model, tokenizer, items) -> number.

- MCQ accuracy: the option whose tokens have the highest summed log-likelihood after the
  question prompt (completion-style, as lm-eval scores `acc`).
- ROUGE-L F1 of greedy answers against the reference answers.
- Perplexity on retain passages: exp of the mean token NLL.

Every scorer batches its items longest first under a token budget (`eval.max_batch_tokens`), so a batch
holds texts of similar length and little padding, and restores the input order in its results. What
they score item by item can be collected with `collect_samples()` (`--log-samples`).
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch
from rouge_score import rouge_scorer
from tqdm import tqdm

from unlearn.tasks.data import MCQ, Encoded, Example, collate, encode, on_device, prompt_ids
from unlearn.tasks.scoring import next_token_logprobs, sequence_logprobs, split_head

# ---------------------------------------------------------------------------------------------- scope


@dataclass(frozen=True)
class _Scope:
    """What the scorer running now belongs to: the metric (progress bar title, sample tag), whether bars are
    drawn, and where per-item samples go (None: not collected)."""

    metric: str = ""
    progress: bool = False
    samples: list[dict[str, Any]] | None = None


# A context variable rather than a parameter threaded through every scorer: the metric name and the sample
# sink are known by the step runner, several calls above the loops that score the items.
_SCOPE: ContextVar[_Scope] = ContextVar("unlearn_eval_scope", default=_Scope())  # noqa: B039 - frozen


@contextmanager
def collect_samples() -> Iterator[list[dict[str, Any]]]:
    """Collect one dict per scored item (metric, index, prompt, gold, scores or generation, correct, ...)."""
    samples: list[dict[str, Any]] = []
    token = _SCOPE.set(replace(_SCOPE.get(), samples=samples))
    try:
        yield samples
    finally:
        _SCOPE.reset(token)


@contextmanager
def metric_scope(metric: str, progress: bool | None = None) -> Iterator[None]:
    scope = _SCOPE.get()
    token = _SCOPE.set(replace(scope, metric=metric, progress=scope.progress if progress is None else progress))
    try:
        yield
    finally:
        _SCOPE.reset(token)


# Per-item fields of the scorers' sample rows, and the metric keys they can be the mean of, given the row's tag T:
# an MCQ step T reports T_acc and T_prob (run_steps' `<key>_<sub>`), a scorer under its own key reports T itself.
_ITEM_FIELDS = (("correct", ("_acc", "")), ("prob", ("_prob",)), ("score", ("",)))


def item_values(samples: list[dict[str, Any]], metrics: dict[str, float]) -> dict[str, list[float]]:
    """The per-item values behind every metric of `metrics` that is a mean over items, from one evaluation's
    samples, in item order. A field is matched to a metric only when their mean is that metric's value (to float
    rounding), so a key that merely looks alike is never given values that are not its own."""
    by_tag: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in samples:
        by_tag[str(row.get("metric", ""))].append(row)
    out: dict[str, list[float]] = {}
    for tag, rows in by_tag.items():
        if [r.get("index") for r in rows] != list(range(len(rows))):
            continue  # scored more than once under one tag: which rows belong to the metric is unclear
        for name, suffixes in _ITEM_FIELDS:
            if not all(isinstance(r.get(name), bool | int | float) for r in rows):
                continue
            values = [float(r[name]) for r in rows]
            mean = sum(values) / len(values)
            key = next((tag + x for x in suffixes if isinstance(metrics.get(tag + x), float | int)
                        and math.isclose(mean, metrics[tag + x], rel_tol=1e-9, abs_tol=1e-12)), None)
            if key is not None:
                out[key] = values
    return out


def evaluate_items(evaluate: Callable[[], dict[str, float]]) -> tuple[dict[str, float], dict[str, list[float]],
                                                                     list[dict[str, Any]]]:
    """(metrics, their per-item values, the samples) of one evaluation: `evaluate()` run collecting samples."""
    with collect_samples() as samples:
        metrics = evaluate()
    return metrics, item_values(samples, metrics), samples


def collecting_samples() -> bool:
    return _SCOPE.get().samples is not None


def log_samples(rows: list[dict[str, Any]], metric: str | None = None) -> None:
    """Add per-item rows (in input order) to the collected samples, tagged with the metric they score."""
    scope = _SCOPE.get()
    if scope.samples is None:
        return
    name = scope.metric if metric is None else metric
    scope.samples.extend({"metric": name, "index": i, **row} for i, row in enumerate(rows))


def progress_bar(total: int) -> tqdm:
    scope = _SCOPE.get()
    return tqdm(total=total, desc=scope.metric or "scoring", unit="item", disable=not scope.progress, leave=False)


# ---------------------------------------------------------------------------------------------- batching


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Item indices in batches, longest first: at most `batch_size` rows and, when `max_tokens` is set, at
    most that many tokens once padded (a single item longer than the budget gets a batch of its own).
    Sorting keeps similar lengths together, so padding is small; longest first makes an out-of-memory batch
    show itself at the start, not after minutes (lm-eval orders its requests the same way)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep the input order
    batches: list[list[int]] = []
    for index in order:
        if batches:
            batch = batches[-1]
            width = lengths[batch[0]]  # the batch's first item is its longest
            if len(batch) < batch_size and (max_tokens is None or width * (len(batch) + 1) <= max_tokens):
                batch.append(index)
                continue
        batches.append([index])
    return batches


def model_context(model: Any) -> int | None:
    """The longest sequence the model takes (its position table), or None when it does not say."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _scoring_item(tokenizer: Any, prompt: str, continuation: str, context: int | None) -> Encoded:
    """prompt + continuation as token ids, cut from the left to the model's context when longer (what
    lm-eval does), never cut at a fixed length: long questions are scored whole."""
    prompt_part = prompt_ids(tokenizer, prompt)
    ids = prompt_part + tokenizer(continuation, add_special_tokens=False).input_ids
    n_prompt = len(prompt_part)
    if context is not None and len(ids) > context:
        cut = len(ids) - context
        ids, n_prompt = ids[cut:], max(0, n_prompt - cut)
    return Encoded(input_ids=ids, n_prompt=n_prompt)


def run_batches(items: Sequence[Encoded], batch_size: int, max_tokens: int | None, pad_id: int,
                 score: Callable[[dict[str, torch.Tensor], list[int]], list[Any]]) -> list[Any]:
    """`score(batch, indices)` over length-sorted batches of `items`, one result per item in input order."""
    out: list[Any] = [None] * len(items)
    with progress_bar(len(items)) as bar:
        for indices in length_batches([len(it.input_ids) for it in items], batch_size, max_tokens):
            batch = collate([items[i] for i in indices], pad_id)
            for i, value in zip(indices, score(batch, indices), strict=True):
                out[i] = value
            bar.update(len(indices))
    return out


# ---------------------------------------------------------------------------------------------- MCQ


def choice_scores(model, tokenizer, questions: list[MCQ], batch_size: int = 64,
                  max_batch_tokens: int | None = None) -> list[list[float]]:
    """Summed log-likelihood of each choice as a continuation of its question's prompt (after a space, as
    lm-eval's target delimiter puts it): one list per question (see `scored_choices`)."""
    return [s for s, _ in scored_choices(model, tokenizer, questions, batch_size, max_batch_tokens)]


@torch.no_grad()
def scored_choices(model, tokenizer, questions: list[MCQ], batch_size: int = 64,
                   max_batch_tokens: int | None = None,
                   share_prompt: bool = True) -> list[tuple[list[float], list[int]]]:
    """(summed log-likelihood of each choice, its length in tokens) per question.

    Questions whose choices are all one token long (" A" ... " D": WMDP, MMLU) take one forward of the prompt,
    reading every choice off the next-token distribution at the last position only, instead of one forward
    per choice and the output head at every position; the value is the same log p(choice | prompt). Longer
    choices continue their question's cached prompt (`share_prompt`; `_shared_prompt_scores`), else each
    prompt + choice is scored whole (`python -m unlearn.perf.mcq_prefix` times both).
    """
    context = model_context(model)
    encoded = [[_scoring_item(tokenizer, q.prompt, " " + choice, context) for choice in q.choices]
               for q in questions]
    lengths = [[len(it.input_ids) - it.n_prompt for it in items] for items in encoded]
    single = [i for i, items in enumerate(encoded)
              if all(it.n_prompt >= 1 and len(it.input_ids) - it.n_prompt == 1 for it in items)]
    out: dict[int, list[float]] = {}
    if single:
        prompts = [encoded[i][0].input_ids[:encoded[i][0].n_prompt] for i in single]
        tokens = [[it.input_ids[-1] for it in encoded[i]] for i in single]
        out.update(zip(single, _next_token_scores(model, prompts, tokens, tokenizer.pad_token_id, batch_size,
                                                  max_batch_tokens), strict=True))
    rest = [i for i in range(len(questions)) if i not in out]
    shared = [i for i in rest if all(it.n_prompt >= 1 for it in encoded[i])] \
        if share_prompt and split_head(model) else []
    if shared:
        out.update(zip(shared, _shared_prompt_scores(model, [encoded[i] for i in shared], tokenizer.pad_token_id,
                                                     batch_size, max_batch_tokens), strict=True))
        rest = [i for i in rest if i not in out]
    items = [it for i in rest for it in encoded[i]]
    if items:
        def summed(batch: dict[str, torch.Tensor], _indices: list[int]) -> list[float]:
            return sequence_logprobs(model, on_device(model, batch), padding_mask=False)[0].float().cpu().tolist()

        flat = run_batches(items, batch_size, max_batch_tokens, tokenizer.pad_token_id, summed)
        start = 0
        for i in rest:
            out[i] = flat[start:start + len(encoded[i])]
            start += len(encoded[i])
    return [(out[i], lengths[i]) for i in range(len(questions))]


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), each row padded on the left, so every row ends where what follows begins."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tokens in enumerate(rows):
        if tokens:
            ids[row, width - len(tokens):] = torch.tensor(list(tokens))
            mask[row, width - len(tokens):] = 1
    return ids, mask


def _shared_prompt_scores(model, encoded: list[list[Encoded]], pad_id: int, batch_size: int,
                          max_batch_tokens: int | None) -> list[list[float]]:
    """Summed log p(choice | prompt) of each question's choices, the prompt run once per question instead of once
    per choice: prompts left-padded through the decoder with its key/value cache, then every choice continues from
    its own question's cache (position ids carried on). The same values as scoring each prompt + choice whole (a test
    checks it), at about (prompt + choices) instead of choices × (prompt + choice) tokens."""
    decoder, head = split_head(model)  # type: ignore[misc]
    device = next(model.parameters()).device
    prompts = [q[0].input_ids[:q[0].n_prompt] for q in encoded]
    choices = [[it.input_ids[it.n_prompt:] for it in q] for q in encoded]
    # A question's padded cost: its prompt, plus its choices at the longest choice's width.
    lengths = [len(p) + len(c) * max(len(x) for x in c) for p, c in zip(prompts, choices, strict=True)]
    out: list[list[float]] = [[] for _ in encoded]
    with progress_bar(len(encoded)) as bar:
        for indices in length_batches(lengths, batch_size, max_batch_tokens):
            ids, mask = left_padded([prompts[i] for i in indices], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            first = decoder(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                            use_cache=True)
            start = torch.log_softmax(head(first.last_hidden_state[:, -1]).float(), dim=-1)  # each choice's 1st token
            owner = [row for row, i in enumerate(indices) for _ in choices[i]]  # choice row -> its question's row
            flat = [c for i in indices for c in choices[i]]
            cwidth = max(len(c) for c in flat)
            cids = torch.full((len(flat), cwidth), pad_id, dtype=torch.long)
            cmask = torch.zeros((len(flat), cwidth), dtype=torch.long)
            for row, c in enumerate(flat):
                cids[row, :len(c)] = torch.tensor(c)
                cmask[row, :len(c)] = 1
            cids, cmask = cids.to(device), cmask.to(device)
            rows = torch.tensor(owner, device=device)
            cache = first.cache if hasattr(first, "cache") else first.past_key_values
            cache.batch_select_indices(rows)
            positions = mask.sum(1)[rows][:, None] + torch.arange(cwidth, device=device)[None]
            hidden = decoder(input_ids=cids, attention_mask=torch.cat([mask[rows], cmask], dim=1),
                             position_ids=positions, use_cache=True, **{_cache_keyword(decoder): cache}
                             ).last_hidden_state
            summed = start[rows, cids[:, 0]].double()
            later = cmask[:, 1:].bool()  # token t >= 1 of a choice is predicted at its position t - 1
            if later.any():
                logits = head(hidden[:, :-1][later]).float()
                token_lp = torch.log_softmax(logits, dim=-1).gather(1, cids[:, 1:][later][:, None])[:, 0]
                summed = summed.index_add(0, later.nonzero()[:, 0], token_lp.double())
            values = summed.cpu().tolist()
            for row, i in enumerate(indices):
                out[i] = [values[r] for r, o in enumerate(owner) if o == row]
            bar.update(len(indices))
    return out


def _cache_keyword(decoder: Any) -> str:
    """transformers 5 names the key/value cache argument `cache` (`past_key_values` before, still accepted)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _next_token_scores(model, prompts: list[list[int]], tokens: list[list[int]], pad_id: int,
                       batch_size: int, max_batch_tokens: int | None = None) -> list[list[float]]:
    """log p(t | prompt) for each prompt's candidate tokens `t`, one forward per prompt."""
    items = [Encoded(input_ids=ids, n_prompt=len(ids)) for ids in prompts]

    def score(batch: dict[str, torch.Tensor], indices: list[int]) -> list[list[float]]:
        logprobs = next_token_logprobs(model, on_device(model, batch), padding_mask=False).cpu()
        return [logprobs[row, tokens[i]].tolist() for row, i in enumerate(indices)]

    return run_batches(items, batch_size, max_batch_tokens, pad_id, score)


def answer_probability(scores: Sequence[float], lengths: Sequence[int], answer: int) -> float:
    """The normalized probability of the correct answer among the choices, as TOFU's Prob: each choice's
    probability taken per token (exp of its mean token log-likelihood, so long choices are not penalized), then
    the correct one's share of their sum. 1/len(choices) = no preference; unlike accuracy it moves continuously."""
    per_token = torch.tensor([s / max(n, 1) for s, n in zip(scores, lengths, strict=True)], dtype=torch.float64)
    return float(torch.softmax(per_token, dim=0)[answer])


def mcq_graded(model, tokenizer, questions: list[MCQ], batch_size: int = 64,
               max_batch_tokens: int | None = None) -> tuple[list[bool], list[float]]:
    """Per question: whether it is answered right (the choice with the highest summed log-likelihood, the first
    one on ties, as numpy's argmax in lm-eval) and the normalized probability of its answer
    (`answer_probability`), from one scoring pass. Logged per question when samples are collected."""
    scored = scored_choices(model, tokenizer, questions, batch_size, max_batch_tokens)
    picks = [max(range(len(s)), key=s.__getitem__) for s, _ in scored]
    correct = [pick == q.answer_index for q, pick in zip(questions, picks, strict=True)]
    probs = [answer_probability(s, n, q.answer_index) for q, (s, n) in zip(questions, scored, strict=True)]
    if collecting_samples():
        log_samples([{"prompt": q.prompt, "choices": q.choices, "gold": q.answer_index, "scores": s, "pred": pick,
                      "correct": ok, "prob": prob, "concept": q.tag}
                     for q, (s, _), pick, ok, prob in zip(questions, scored, picks, correct, probs, strict=True)])
    return correct, probs


def mcq_correct(model, tokenizer, questions: list[MCQ], batch_size: int = 64,
                max_batch_tokens: int | None = None) -> list[bool]:
    """Whether each question is answered right (see `mcq_graded`)."""
    return mcq_graded(model, tokenizer, questions, batch_size, max_batch_tokens)[0]


def mcq_accuracy(model, tokenizer, questions: list[MCQ], batch_size: int = 64,
                 max_batch_tokens: int | None = None, prob: bool = False) -> dict[str, float]:
    """Overall accuracy plus accuracy per tag (see `mcq_graded`); with `prob`, also `prob`: the mean normalized
    probability of the answers."""
    if not questions:
        return {}
    correct, probs = mcq_graded(model, tokenizer, questions, batch_size, max_batch_tokens)
    out = tagged_accuracy([q.tag for q in questions], correct)
    return out | {"prob": sum(probs) / len(probs)} if prob else out


def tagged_accuracy(tags: list[str], correct: list[bool]) -> dict[str, float]:
    """`acc` plus `acc/<tag>` for every concept tag the questions carry ("" = untagged, no breakdown)."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for tag, ok in zip(tags, correct, strict=True):
        if tag:
            by_tag[tag].append(ok)
    out = {"acc": sum(correct) / len(correct)}
    out.update({f"acc/{tag}": sum(v) / len(v) for tag, v in sorted(by_tag.items())})
    return out


# ---------------------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 32,
                   add_special_tokens: bool = False, clean_up_spaces: bool | None = None,
                   max_batch_tokens: int | None = None) -> list[str]:
    """Greedy continuations of each prompt, whole (special tokens dropped), in input order. Batched longest
    first with left padding, so every prompt ends where generation starts. `add_special_tokens` and
    `clean_up_spaces` follow the tokenizer's defaults unless a benchmark's reference code fixes them; without special
    tokens a prompt still gets the BOS its tokenizer would put first (`prompt_ids`)."""
    encoded = [tokenizer(p, add_special_tokens=True).input_ids if add_special_tokens else prompt_ids(tokenizer, p)
               for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = getattr(model, "device", None)
    out: list[str] = [""] * len(prompts)
    decode_options = {} if clean_up_spaces is None else {"clean_up_tokenization_spaces": clean_up_spaces}
    lengths = [len(ids) + max_new_tokens for ids in encoded]
    with progress_bar(len(prompts)) as bar:
        for indices in length_batches(lengths, batch_size, max_batch_tokens):
            input_ids, mask = left_padded([encoded[i] for i in indices], pad)
            width = input_ids.shape[1]
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True, **decode_options)
            for i, text in zip(indices, texts, strict=True):
                out[i] = text
            bar.update(len(indices))
    return out


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 16,
                     batch_size: int = 32, max_batch_tokens: int | None = None) -> list[str]:
    """Greedy answers cut at their first line (a QA answer ends there), stripped."""
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, max_batch_tokens=max_batch_tokens)
    return [t.split("\n")[0].strip() for t in texts]


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_scores(references: list[str], predictions: list[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (rouge-score, no stemming)."""
    return [_ROUGE.score(r, p)["rougeL"].fmeasure for r, p in zip(references, predictions, strict=True)]


def log_generations(prompts: list[str], golds: list[str], generations: list[str], scores: list[float]) -> None:
    if collecting_samples():
        log_samples([{"prompt": p, "gold": g, "generation": out, "score": s}
                     for p, g, out, s in zip(prompts, golds, generations, scores, strict=True)])


def rouge_l(model, tokenizer, pairs: list[Example], max_new_tokens: int = 16, batch_size: int = 32,
            max_batch_tokens: int | None = None) -> float:
    prompts = [p.prompt for p in pairs]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, max_batch_tokens) if pairs else []
    golds = [p.target.strip() for p in pairs]
    scores = rouge_l_scores(golds, answers)
    log_generations(prompts, golds, answers, scores)
    return sum(scores) / len(scores) if scores else float("nan")


_MAX_EXP = math.log(float.fromhex("0x1.fffffffffffffp+1023"))  # largest x with exp(x) finite


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], batch_size: int = 32, max_batch_tokens: int | None = None) -> float:
    if not texts:
        return float("nan")
    items = [encode(tokenizer, Example("", t), add_eos=False) for t in texts]

    def score(batch: dict[str, torch.Tensor], _indices: list[int]) -> list[tuple[float, int]]:
        summed, counts = sequence_logprobs(model, on_device(model, batch), padding_mask=False)
        return list(zip(summed.tolist(), counts.tolist(), strict=True))

    per_text = run_batches(items, batch_size, max_batch_tokens, tokenizer.pad_token_id, score)
    total_lp = sum(lp for lp, _ in per_text)
    total_tokens = sum(int(n) for _, n in per_text)
    if collecting_samples():
        log_samples([{"text": t, "tokens": int(n), "nll": -lp / max(int(n), 1)}
                     for t, (lp, n) in zip(texts, per_text, strict=True)])
    nll = -total_lp / max(total_tokens, 1)
    # A wrecked model (e.g. a diverged unlearning run) can have a mean NLL past exp's float range; its
    # perplexity is then reported as inf rather than crashing the evaluation.
    return math.exp(nll) if nll < _MAX_EXP else float("inf")


def run_steps(steps: list[tuple[str, Callable[[], float | dict[str, float]]]],
              progress: bool = True) -> dict[str, float]:
    """Evaluate named metric steps in order; a step returning a dict adds `<key>_<sub>` entries (just `<sub>`
    when the key is empty). Inside a step, scorers draw one progress bar per step, advanced per batch."""
    metrics: dict[str, float] = {}
    for key, fn in tqdm(steps, desc="evaluating", disable=not progress or len(steps) < 2, leave=False):
        with metric_scope(key, progress):
            value = fn()
        if isinstance(value, dict):
            metrics.update({f"{key}_{k}" if key else k: v for k, v in value.items()})
        else:
            metrics[key] = value
    return metrics
