"""The MUSE task: its evaluation (VerbMem, KnowMem, PrivLeak) and the probe the relearning attack repeats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from unlearn.benchmarks.muse.metrics import knowmem_answer, knowmem_prompt, privleak, privleak_auc, verbmem_reference
from unlearn.benchmarks.muse.passes import min_k_scores
from unlearn.benchmarks.muse.settings import SCALE, MuseSettings
from unlearn.evaluation.measures import (
    collecting_samples,
    generate_texts,
    log_generations,
    log_samples,
    metric_scope,
    rouge_l_scores,
    run_steps,
)
from unlearn.tasks.data import Example
from unlearn.tasks.task import Membership, Task


@dataclass
class MuseTask(Task):
    settings: MuseSettings = field(default_factory=MuseSettings)
    verbmem: list[tuple[str, str]] = field(default_factory=list)  # (prompt, gt)
    knowmem: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # forget/retain: (question, answer)
    icl: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # forget/retain few-shot examples
    privleak_texts: dict[str, list[str]] = field(default_factory=dict)  # forget, holdout
    _auc_retrain: float | None = field(default=None, init=False, repr=False)  # computed once per task

    def privleak_auc(self, model: Any, tokenizer: Any, batch_size: int,
                     max_batch_tokens: int | None = None) -> dict[str, float]:
        """{"auc": ..., "truncated": passages cut to fit (only when some were)}; samples logged per passage."""
        s = self.settings
        scores, scored = {}, {}
        for split in ("forget", "holdout"):
            scores[split], scored[split] = min_k_scores(model, tokenizer, self.privleak_texts[split], s.k_percent,
                                                        s.privleak_max_tokens, batch_size, max_batch_tokens)
        out = {"auc": privleak_auc(scores["forget"], scores["holdout"])}
        truncated = sum(item.truncated for split in scored.values() for item in split)
        if truncated:
            out["truncated"] = float(truncated)
        if collecting_samples():
            log_samples([{"split": split, "member": split == "holdout", "text": text, "tokens": item.n_tokens,
                          "scored_tokens": item.logprobs.numel() + 1, "truncated": item.truncated, "min_k": score}
                         for split in ("forget", "holdout")
                         for text, item, score in zip(self.privleak_texts[split], scored[split], scores[split],
                                                      strict=True)])
        return out

    def auc_retrain(self, like: Any, batch_size: int, max_batch_tokens: int | None = None) -> float | None:
        """AUC_retrain: given, or measured once on benchmark.retrain_model (loaded like `like`, the model being
        evaluated; then cached on the task)."""
        if self.settings.auc_retrain is not None:
            return self.settings.auc_retrain
        if self.settings.retrain_model is None:
            return None
        if self._auc_retrain is None:
            from unlearn.compute.models import score_side_model

            def measure(retrained: Any, tokenizer: Any) -> float:
                with metric_scope("muse/privleak_auc_retrain"):
                    return self.privleak_auc(retrained, tokenizer, batch_size, max_batch_tokens)["auc"]

            self._auc_retrain = score_side_model(self.settings.retrain_model, like, measure)
        return self._auc_retrain

    def _generation_steps(self, model: Any, tokenizer: Any, settings: Any) -> list[tuple[str, Callable[[], float]]]:
        """VerbMem and KnowMem: the metrics computed from generations."""
        s, batch_size, budget = self.settings, settings.batch_size, settings.max_batch_tokens

        def generate(prompts: list[str], max_new_tokens: int) -> list[str]:
            # MUSE encodes prompts with special tokens and decodes with clean-up of tokenization spaces.
            return generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens=True,
                                  clean_up_spaces=True, max_batch_tokens=budget)

        def scored(prompts: list[str], golds: list[str], outputs: list[str]) -> float:
            scores = rouge_l_scores(golds, outputs)
            log_generations(prompts, golds, outputs, [SCALE * x for x in scores])
            return SCALE * sum(scores) / len(scores) if scores else float("nan")

        def verbmem() -> float:
            prompts = [p for p, _ in self.verbmem]
            golds = [verbmem_reference(tokenizer, gt, s.verbmem_tokens) for _, gt in self.verbmem]
            return scored(prompts, golds, generate(prompts, s.verbmem_tokens))

        def knowmem(split: str) -> float:
            pairs = self.knowmem[split]
            prompts = [knowmem_prompt(q, self.icl.get(split, [])) for q, _ in pairs]
            answers = [knowmem_answer(g) for g in generate(prompts, s.knowmem_tokens)]
            return scored(prompts, [a for _, a in pairs], answers)

        return [("muse/verbmem_forget", verbmem), ("muse/knowmem_forget", lambda: knowmem("forget")),
                ("muse/knowmem_retain", lambda: knowmem("retain"))]

    def membership(self) -> Membership:
        """PrivLeak's passages: privleak/forget against privleak/holdout, each scored whole."""
        return Membership([Example("", t) for t in self.privleak_texts["forget"]],
                          [Example("", t) for t in self.privleak_texts["holdout"]],
                          "privleak forget vs holdout passages (whole)")

    @torch.no_grad()
    def probe(self, model: Any, tokenizer: Any, settings: Any) -> dict[str, float]:
        """VerbMem and KnowMem without the Min-K% pass over every PrivLeak passage."""
        model.eval()
        return run_steps(list(self._generation_steps(model, tokenizer, settings)), progress=False)

    @torch.no_grad()
    def evaluate(self, model: Any, tokenizer: Any, settings: Any, progress: bool = True) -> dict[str, float]:
        s, batch_size, budget = self.settings, settings.batch_size, settings.max_batch_tokens
        model.eval()

        def retrain_auc() -> float:
            value = self.auc_retrain(model, batch_size, budget)
            assert value is not None  # only asked for when benchmark.retrain_model is set
            return value

        steps: list[tuple[str, Callable[[], float | dict[str, float]]]] = [
            *self._generation_steps(model, tokenizer, settings),
            ("muse/privleak", lambda: self.privleak_auc(model, tokenizer, batch_size, budget)),
        ]
        if s.auc_retrain is None and s.retrain_model is not None:
            # Its own step (a model load and a Min-K% pass the first time) so the progress bar shows it.
            steps.append(("muse/privleak_auc_retrain", retrain_auc))
        metrics = run_steps(steps, progress)
        retrain = self.auc_retrain(model, batch_size, budget)
        if retrain is not None:
            metrics["muse/privleak_auc_retrain"] = retrain
            if retrain > 0:  # a retrained AUC of exactly 0 leaves the ratio undefined: report the AUCs only
                metrics["muse/privleak"] = privleak(metrics["muse/privleak_auc"], retrain)
        return metrics
