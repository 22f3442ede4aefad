"""The TOFU task: its evaluation (Prob, ROUGE-L recall, truth ratio, forget quality, model utility) and the probe
the relearning attack repeats."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from unlearn.benchmarks.tofu.metrics import (
    answer_prob,
    forget_quality,
    forget_truth_ratio,
    model_utility,
    normalized_prob,
    rouge_l_recall,
    truth_ratio,
    utility_truth_ratio,
)
from unlearn.benchmarks.tofu.settings import UTILITY_PARTS, TofuSettings
from unlearn.benchmarks.tofu.sources import QA
from unlearn.core.errors import UserError
from unlearn.evaluation.measures import (
    generate_texts,
    log_generations,
    log_samples,
    metric_scope,
    model_context,
    run_batches,
    run_steps,
)
from unlearn.storage.metrics import Metric
from unlearn.tasks.data import Encoded, Example, on_device
from unlearn.tasks.scoring import sequence_logprobs
from unlearn.tasks.task import ItemSubset, Membership, RelearnPlan, Task, split_items

UNSEEN = (Metric("forget_unseen_prob", "forget Prob (unseen)", "lower", "forget", "per-token probability (0-1)"),
          Metric("forget_unseen_truth_ratio", "forget truth ratio (unseen)", "higher", "forget", "truth ratio (0-1)"),
          Metric("retain_prob", "retain Prob", "higher", "utility", "per-token probability (0-1)"))
UNSEEN_ITEMS = {"forget_unseen_prob": "tofu/forget_prob", "forget_unseen_truth_ratio": "tofu/forget_truth_ratio"}


def prompt_and_answer(settings: TofuSettings, question: str, answer: str) -> tuple[str, str]:
    """TOFU's text, question_start_tag + question + question_end_tag + answer_tag + answer, split where the answer
    begins. TOFU tokenizes it whole, so the space its answer tag ends with is read as the start of the answer's first
    token (" Paris"); the whitespace moves to the answer here, and the answer's tokens come out the same."""
    prompt = settings.question_start_tag + question + settings.question_end_tag + settings.answer_tag
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped):] + answer


@dataclass
class Losses:
    """Mean token NLLs of one set's answers: the answer, the answer its truth ratio takes as correct, and each
    perturbed answer, per item."""

    answer: list[float]
    correct: list[float]
    perturbed: list[list[float]]

    def ratios(self) -> list[float]:
        return [truth_ratio(c, w) for c, w in zip(self.correct, self.perturbed, strict=True)]


@dataclass
class TofuTask(Task):
    settings: TofuSettings = field(default_factory=TofuSettings)
    sets: dict[str, list[QA]] = field(default_factory=dict)  # forget, retain, ra, wf: the perturbed sets
    correct_field: dict[str, str] = field(default_factory=dict)  # per set: paraphrased_answer or answer
    holdout: list[QA] = field(default_factory=list)  # holdoutNN, when the data has it (membership inference)
    retain_ratios: list[float] | None = None  # a retain model's forget truth ratios, from a file
    forget_questions: list[str] = field(default_factory=list)  # the question of each forget training pair
    _measured_retain: list[float] | None = field(default=None, init=False, repr=False)

    # ------------------------------------------------------------------------------------------ model passes

    def mean_nlls(self, model: Any, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int,
                  max_batch_tokens: int | None) -> list[float]:
        """Mean NLL of each (question, answer)'s answer tokens and EOS, the prompt tokenized with the tokenizer's
        special tokens (a BOS where it adds one), as TOFU tokenizes its text; cut from the left to the context."""
        context = model_context(model)
        items = []
        for question, answer in pairs:
            prompt, target = prompt_and_answer(self.settings, question, answer)
            prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
            target_ids = tokenizer(target, add_special_tokens=False).input_ids
            if tokenizer.eos_token_id is not None:
                target_ids = [*target_ids, tokenizer.eos_token_id]
            ids, n_prompt = prompt_ids + target_ids, len(prompt_ids)
            if context is not None and len(ids) > context:
                cut = len(ids) - context
                ids, n_prompt = ids[cut:], max(1, n_prompt - cut)
            items.append(Encoded(input_ids=ids, n_prompt=n_prompt))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def score(batch: dict[str, torch.Tensor], _indices: list[int]) -> list[float]:
            summed, counts = sequence_logprobs(model, on_device(model, batch), padding_mask=False)
            return [-s / max(int(n), 1) for s, n in zip(summed.tolist(), counts.tolist(), strict=True)]

        return run_batches(items, batch_size, max_batch_tokens, pad, score)

    def losses(self, model: Any, tokenizer: Any, name: str, settings: Any,
               items: list[QA] | None = None) -> Losses:
        """One scoring pass over a set's answers (all of its items, or `items`)."""
        items = self.sets[name] if items is None else items
        use_answer = self.correct_field.get(name) == "answer"
        pairs: list[tuple[str, str]] = []
        for qa in items:
            pairs.append((qa.question, qa.answer))
            if not use_answer:
                pairs.append((qa.question, qa.paraphrased))
            pairs.extend((qa.question, w) for w in qa.perturbed)
        flat = self.mean_nlls(model, tokenizer, pairs, settings.batch_size, settings.max_batch_tokens)
        out, at = Losses([], [], []), 0
        for qa in items:
            out.answer.append(flat[at])
            out.correct.append(flat[at] if use_answer else flat[at + 1])
            at += 1 if use_answer else 2
            out.perturbed.append(flat[at:at + len(qa.perturbed)])
            at += len(qa.perturbed)
        return out

    # ------------------------------------------------------------------------------------------ metrics

    def _set_step(self, model: Any, tokenizer: Any, settings: Any, name: str,
                  kept: dict[str, list[float]]) -> dict[str, float]:
        """Prob and truth ratio of one set, as TOFU aggregates that set: the forget set's truth ratio as
        min(R, 1/R) (its per-item R kept for forget quality), the others' as max(0, 1 - R); real authors and world
        facts take Prob normalized among the options."""
        losses = self.losses(model, tokenizer, name, settings)
        if self.correct_field[name] == "answer":
            probs = [normalized_prob(a, w) for a, w in zip(losses.answer, losses.perturbed, strict=True)]
        else:
            probs = [answer_prob(x) for x in losses.answer]
        ratios = losses.ratios()
        forget = name == "forget"
        if forget:
            kept["ratios"] = ratios
        per_item = [(min(r, 1 / r) if r > 0 else 0.0) if forget else max(0.0, 1 - r) for r in ratios]
        items = self.sets[name]
        log_samples([{"question": qa.question, "answer": qa.answer, "nll": nll, "score": p}
                     for qa, nll, p in zip(items, losses.answer, probs, strict=True)], metric=f"tofu/{name}_prob")
        log_samples([{"question": qa.question, "truth_ratio": r, "score": value}
                     for qa, r, value in zip(items, ratios, per_item, strict=True)],
                    metric=f"tofu/{name}_truth_ratio")
        aggregate = forget_truth_ratio if forget else utility_truth_ratio
        return {"prob": _mean(probs), "truth_ratio": aggregate(ratios)}

    def _rouge_step(self, model: Any, tokenizer: Any, settings: Any, name: str) -> float:
        items = self.sets[name]
        prompts = [prompt_and_answer(self.settings, qa.question, "")[0] for qa in items]
        # TOFU encodes generation prompts with special tokens and scores the whole decoded continuation.
        texts = generate_texts(model, tokenizer, prompts, self.settings.generation_tokens, settings.batch_size,
                               add_special_tokens=True, max_batch_tokens=settings.max_batch_tokens)
        outputs = [t.strip() for t in texts]
        scores = [rouge_l_recall(qa.answer, out) for qa, out in zip(items, outputs, strict=True)]
        log_generations(prompts, [qa.answer for qa in items], outputs, scores)
        return _mean(scores)

    def retain_model_ratios(self, like: Any, settings: Any) -> list[float] | None:
        """The retain model's forget truth ratios: given in a file, or measured once on benchmark.retain_model
        (loaded like `like`, the model being evaluated)."""
        if self.retain_ratios is not None:
            return self.retain_ratios
        if self.settings.retain_model is None:
            return None
        if self._measured_retain is None:
            from unlearn.compute.models import score_side_model

            def measure(reference: Any, tokenizer: Any) -> list[float]:
                with metric_scope("tofu/retain_model"):
                    return self.losses(reference, tokenizer, "forget", settings).ratios()

            self._measured_retain = score_side_model(self.settings.retain_model, like, measure)
        return self._measured_retain

    @torch.no_grad()
    def evaluate(self, model: Any, tokenizer: Any, settings: Any, progress: bool = True) -> dict[str, float]:
        model.eval()
        kept: dict[str, list[float]] = {}
        steps: list[tuple[str, Callable[[], float | dict[str, float]]]] = [
            (f"tofu/{name}", lambda n=name: self._set_step(model, tokenizer, settings, n, kept)) for name in self.sets]
        if settings.rouge:  # greedy generation: the slowest part
            steps += [(f"tofu/{name}_rouge", lambda n=name: self._rouge_step(model, tokenizer, settings, n))
                      for name in self.sets]
        if self.retain_ratios is None and self.settings.retain_model is not None:
            steps.append(("tofu/retain_model", lambda: float(len(self.retain_model_ratios(model, settings) or []))))
        metrics = run_steps(steps, progress)
        metrics.pop("tofu/retain_model", None)  # a step of its own only so the progress bar shows the model load
        reference = self.retain_model_ratios(model, settings)
        if reference is not None:
            metrics["tofu/forget_quality"], metrics["tofu/forget_ks"] = forget_quality(kept["ratios"], reference)
        parts = [metrics.get(key, math.nan) for key in UTILITY_PARTS]
        if not any(math.isnan(v) for v in parts):
            metrics["tofu/model_utility"] = model_utility(parts)
        return metrics

    # ------------------------------------------------------------------------------------------ attacks

    def membership(self) -> Membership | None:
        """The forget set's QA pairs against holdoutNN's (OpenUnlearning's TOFU membership sets), when present."""
        if not self.holdout:
            return None
        return Membership([training_pair(self.settings, qa) for qa in self.sets["forget"]],
                          [training_pair(self.settings, qa) for qa in self.holdout],
                          f"{self.settings.split} vs holdout{self.settings.split.removeprefix('forget')} QA pairs "
                          "(answer tokens)")

    @torch.no_grad()
    def probe(self, model: Any, tokenizer: Any, settings: Any) -> dict[str, float]:
        """Forget Prob and truth ratio and retain Prob: one scoring pass each, no generation."""
        model.eval()
        forget_prob, truth_ratio_, retain_prob = self._probe_values(model, tokenizer, settings, self.sets["forget"])
        return {"tofu/forget_prob": forget_prob, "tofu/forget_truth_ratio": truth_ratio_,
                "tofu/retain_prob": retain_prob}

    def _probe_values(self, model: Any, tokenizer: Any, settings: Any,
                      forget: list[QA]) -> tuple[float, float, float]:
        """(forget Prob, forget truth ratio) on the `forget` items, and retain Prob: one scoring pass each."""
        losses = self.losses(model, tokenizer, "forget", settings, forget)
        retain = self.losses(model, tokenizer, "retain", settings)
        return (_mean([answer_prob(x) for x in losses.answer]), forget_truth_ratio(losses.ratios()),
                _mean([answer_prob(x) for x in retain.answer]))

    def relearn_plan(self, domain: str, samples: int | None, seed: int) -> RelearnPlan:
        """The forget items are split (seeded): the attack fine-tunes on the QA pairs of one part (`samples` of
        them, default half; or, out of domain, on the retain set) and recovery is measured on the other part,
        whose questions it never saw."""
        items = self.sets["forget"]
        used, unseen = split_items(len(items), samples, seed, "forget items")
        used_questions = {items[i].question for i in used} - {items[i].question for i in unseen}
        held = [items[i] for i in unseen]

        def probe(model: Any, tokenizer: Any, settings: Any) -> dict[str, float]:
            model.eval()
            with torch.no_grad():
                forget_prob, truth_ratio_, retain_prob = self._probe_values(model, tokenizer, settings, held)
            return {"forget_unseen_prob": forget_prob, "forget_unseen_truth_ratio": truth_ratio_,
                    "retain_prob": retain_prob}

        pool = self.forget if domain == "forget" else self.retain
        if not pool:
            raise UserError(f"benchmark 'tofu' gives no {domain} set to relearn on: {self.training_hint}")
        if domain == "forget":  # the training pairs of the items picked, matched by question
            pool = [ex for ex, question in zip(self.forget, self.forget_questions, strict=True)
                    if question in used_questions]
            if not pool:
                raise UserError(f"none of the {self.settings.split} questions picked for relearning is in "
                                f"{self.settings.split}_perturbed: the two sets must ask the same questions")
        train = pool
        return RelearnPlan(train=train, probe=probe, probe_metrics=UNSEEN,
                           measured_on="forget items whose questions the relearning never saw",
                           details={"used_forget_indices": used, "unseen_forget_indices": unseen},
                           items=ItemSubset(UNSEEN_ITEMS, unseen))


def training_pair(settings: TofuSettings, qa: QA) -> Example:
    return Example(*prompt_and_answer(settings, qa.question, qa.answer))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
