"""Metrics: each a small function of (model, tokenizer, items) -> number.

- MCQ accuracy: the option whose tokens have the highest summed log-likelihood after the
  question prompt (completion-style, as lm-eval scores `acc`).
- ROUGE-L F1 of greedy answers against the reference answers.
- Perplexity on retain passages: exp of the mean token NLL.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Protocol

import torch
from rouge_score import rouge_scorer
from tqdm import tqdm

from benchmarks.task import MCQ
from unlearn.config import EvalConfig
from unlearn.data import Encoded, Example, encode, fixed_batches
from unlearn.scoring import next_token_logprobs, sequence_logprobs


class EmbeddedLike(Protocol):
    mcq: dict[str, list[MCQ]]
    qa: dict[str, list[Example]]
    passages: dict[str, list[str]]


@torch.no_grad()
def choice_scores(model, tokenizer, questions: list[MCQ], batch_size: int = 64) -> list[list[float]]:
    """Summed log-likelihood of each choice as a continuation of its question's prompt (after a space, as
    lm-eval's target delimiter puts it): one list per question.

    Questions whose choices are all one token long (" A" ... " D": WMDP, MMLU) take one forward of the prompt,
    reading every choice off the next-token distribution, instead of one forward per choice; the value is the
    same log p(choice | prompt), at a quarter of the compute.
    """
    encoded = [[encode(tokenizer, Example(q.prompt, " " + choice), add_eos=False) for choice in q.choices]
               for q in questions]
    single = [i for i, items in enumerate(encoded)
              if all(it.n_prompt >= 1 and len(it.input_ids) - it.n_prompt == 1 for it in items)]
    out: dict[int, list[float]] = {}
    if single:
        prompts = [encoded[i][0].input_ids[:encoded[i][0].n_prompt] for i in single]
        tokens = [[it.input_ids[-1] for it in encoded[i]] for i in single]
        out.update(zip(single, _next_token_scores(model, prompts, tokens, tokenizer.pad_token_id, batch_size),
                       strict=True))
    rest = [i for i in range(len(questions)) if i not in out]
    items = [it for i in rest for it in encoded[i]]
    if items:
        flat = torch.cat([sequence_logprobs(model, b)[0].float().cpu()
                          for b in fixed_batches(items, batch_size, tokenizer.pad_token_id)]).tolist()
        start = 0
        for i in rest:
            out[i] = flat[start:start + len(encoded[i])]
            start += len(encoded[i])
    return [out[i] for i in range(len(questions))]


def _next_token_scores(model, prompts: list[list[int]], tokens: list[list[int]], pad_id: int,
                       batch_size: int) -> list[list[float]]:
    """log p(t | prompt) for each prompt's candidate tokens `t`, one forward per prompt."""
    items = [Encoded(input_ids=ids, n_prompt=len(ids)) for ids in prompts]
    out: list[list[float]] = []
    for start, batch in zip(range(0, len(items), batch_size), fixed_batches(items, batch_size, pad_id), strict=True):
        logprobs = next_token_logprobs(model, {k: v.to(model.device) for k, v in batch.items()}).cpu()
        out.extend(logprobs[row, tokens[start + row]].tolist() for row in range(logprobs.shape[0]))
    return out


def mcq_accuracy(model, tokenizer, questions: list[MCQ], batch_size: int = 64) -> dict[str, float]:
    """Overall accuracy plus accuracy per tag: the choice with the highest log-likelihood is the answer
    (the first one on ties, as numpy's argmax in lm-eval)."""
    if not questions:
        return {}
    scores = choice_scores(model, tokenizer, questions, batch_size)
    correct = [max(range(len(s)), key=s.__getitem__) == q.answer_index for q, s in zip(questions, scores, strict=True)]
    return tagged_accuracy([q.tag for q in questions], correct)


def tagged_accuracy(tags: list[str], correct: list[bool]) -> dict[str, float]:
    """`acc` plus `acc/<tag>` for every concept tag the questions carry ("" = untagged, no breakdown)."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for tag, ok in zip(tags, correct, strict=True):
        if tag:
            by_tag[tag].append(ok)
    out = {"acc": sum(correct) / len(correct)}
    out.update({f"acc/{tag}": sum(v) / len(v) for tag, v in sorted(by_tag.items())})
    return out


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 16,
                     batch_size: int = 32, first_line: bool = True) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends where generation starts. Answers are cut
    at their first line (a QA answer ends there); `first_line=False` keeps whole continuations (VerbMem)."""
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            answers.extend(t.split("\n")[0].strip() if first_line else t for t in texts)
    finally:
        tokenizer.padding_side = side
    return answers


def rouge_l_f1(references: list[str], predictions: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, no stemming); nan when there is nothing to score."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for r, p in zip(references, predictions, strict=True)]
    return sum(scores) / len(scores) if scores else float("nan")


def rouge_l(model, tokenizer, pairs: list[Example], max_new_tokens: int = 16) -> float:
    answers = generate_answers(model, tokenizer, [p.prompt for p in pairs], max_new_tokens) if pairs else []
    return rouge_l_f1([p.target.strip() for p in pairs], answers)


_MAX_EXP = math.log(float.fromhex("0x1.fffffffffffffp+1023"))  # largest x with exp(x) finite


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    if not texts:
        return float("nan")
    items = [encode(tokenizer, Example("", t), add_eos=False) for t in texts]
    total_lp, total_tokens = 0.0, 0
    for batch in fixed_batches(items, batch_size, tokenizer.pad_token_id):
        lp, n = sequence_logprobs(model, batch)
        total_lp += float(lp.sum())
        total_tokens += int(n.sum())
    nll = -total_lp / max(total_tokens, 1)
    # A wrecked model (e.g. a diverged unlearning run) can have a mean NLL past exp's float range; its
    # perplexity is then reported as inf rather than crashing the evaluation.
    return math.exp(nll) if nll < _MAX_EXP else float("inf")


def run_steps(steps: list[tuple[str, Callable[[], float | dict[str, float]]]],
              progress: bool = True) -> dict[str, float]:
    """Evaluate named metric steps in order; a step returning a dict adds `<key>_<sub>` entries (just `<sub>`
    when the key is empty)."""
    metrics: dict[str, float] = {}
    for key, fn in tqdm(steps, desc="evaluating", disable=not progress, leave=False):
        value = fn()
        if isinstance(value, dict):
            metrics.update({f"{key}_{k}" if key else k: v for k, v in value.items()})
        else:
            metrics[key] = value
    return metrics


def evaluate(model, tokenizer, task: EmbeddedLike, settings: EvalConfig | None = None,
             progress: bool = True) -> dict[str, float]:
    """All metrics for one model on the embedded benchmark, as a flat dict (what metrics.json holds)."""
    from unlearn.openqa import make_judge, openqa_accuracy

    settings = settings or EvalConfig()
    batch_size, max_new_tokens = settings.batch_size, settings.max_new_tokens
    model.eval()
    steps: list[tuple[str, Callable[[], float | dict[str, float]]]] = [
        (f"{split}/mcq", lambda s=split: mcq_accuracy(model, tokenizer, task.mcq[s], batch_size))
        for split in task.mcq]
    steps += [(f"{split}/rougeL", lambda s=split: rouge_l(model, tokenizer, task.qa[s], max_new_tokens))
              for split in ("forget", "retain")]
    steps.append(("retain/perplexity", lambda: perplexity(model, tokenizer, task.passages["retain"])))
    if settings.openqa:
        judge = make_judge(settings.judge)
        steps += [(f"{split}/openqa", lambda s=split: openqa_accuracy(model, tokenizer, task.mcq[s], judge))
                  for split in task.mcq]
    return run_steps(steps, progress)
