"""The embedded benchmark as the toolkit consumes it: training pairs and evaluation items.

Forget/retain training data are the QA pairs of those splits; evaluation uses MCQs on every split,
generated answers to the QA pairs, and the retain passages for perplexity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unlearn.benchmarks.synthetic import SPLITS, SyntheticSettings, World, generate
from unlearn.core.errors import UserError
from unlearn.core.settings import (
    AT_LEAST_ONE,
    POSITIVE,
    from_mapping,
    setting,
)
from unlearn.evaluation.measures import mcq_accuracy, perplexity, rouge_l, run_steps
from unlearn.storage.metrics import Metric
from unlearn.tasks.data import MCQ, Example, qa_prompt
from unlearn.tasks.task import BENCHMARKS, Benchmark, ItemSubset, Membership, RelearnPlan, Task, split_items

ACC, ROUGE, PROB = "fraction correct", "ROUGE-L F1 (0-1)", "normalized answer probability (0-1)"
METRICS = (
    Metric("forget/mcq_acc", "forget", "lower", "forget", ACC),
    Metric("forget/mcq_prob", "forget Prob", "lower", "forget", PROB),
    Metric("forget/rougeL", "forget ROUGE-L", "lower", "forget", ROUGE),
    Metric("retain/mcq_acc", "retain", "higher", "utility", ACC, chance=0.25),  # 4 options
    Metric("retain/mcq_prob", "retain Prob", "higher", "utility", PROB),
    Metric("holdout/mcq_acc", "holdout", "none", "info", ACC),
    Metric("holdout/mcq_prob", "holdout Prob", "none", "info", PROB),
    Metric("forget/openqa_acc", "forget open-QA", "lower", "forget", ACC),
    Metric("retain/openqa_acc", "retain open-QA", "higher", "utility", ACC),
    Metric("holdout/openqa_acc", "holdout open-QA", "none", "info", ACC),
    Metric("retain/rougeL", "retain ROUGE-L", "higher", "utility", ROUGE),
    Metric("retain/perplexity", "perplexity", "lower", "utility", "perplexity"),
)
# What the relearning attack measures: MCQ accuracy (and Prob) on the forget facts it did not fine-tune on.
UNSEEN = (Metric("forget_unseen_acc", "forget (unseen)", "lower", "forget", ACC),
          Metric("forget_unseen_prob", "forget Prob (unseen)", "lower", "forget", PROB),
          Metric("retain_acc", "retain", "higher", "utility", ACC))
# The same values as the full evaluation's, restricted to the unseen facts: their per-item values give intervals.
UNSEEN_ITEMS = {"forget_unseen_acc": "forget/mcq_acc", "forget_unseen_prob": "forget/mcq_prob"}


@dataclass
class TaskData(Task):
    mcq: dict[str, list[MCQ]] = field(default_factory=dict)  # per split; tagged by the attribute asked about
    qa: dict[str, list[Example]] = field(default_factory=dict)
    passages: dict[str, list[str]] = field(default_factory=dict)

    def evaluate(self, model: Any, tokenizer: Any, settings: Any, progress: bool = True) -> dict[str, float]:
        """All metrics for one model, as a flat dict (what metrics.json holds)."""
        from unlearn.evaluation.judge import make_judge, openqa_accuracy

        size, budget, max_new_tokens = settings.batch_size, settings.max_batch_tokens, settings.max_new_tokens
        model.eval()
        steps = self._mcq_steps(model, tokenizer, settings, self.mcq)
        if settings.rouge:  # greedy generation: the slowest part of this evaluation
            steps += [(f"{split}/rougeL", lambda s=split: rouge_l(model, tokenizer, self.qa[s], max_new_tokens, size,
                                                                   budget))
                      for split in ("forget", "retain")]
        steps.append(("retain/perplexity", lambda: perplexity(model, tokenizer, self.passages["retain"], size, budget)))
        if settings.openqa:
            judge = make_judge(settings.judge)
            steps += [(f"{split}/openqa", lambda s=split: openqa_accuracy(model, tokenizer, self.mcq[s], judge,
                                                                          batch_size=size, max_batch_tokens=budget))
                      for split in self.mcq]
        return run_steps(steps, progress)

    def _mcq_steps(self, model: Any, tokenizer: Any, settings: Any,
                   splits: Any) -> list[tuple[str, Callable[[], float | dict[str, float]]]]:
        size, budget = settings.batch_size, settings.max_batch_tokens
        return [(f"{split}/mcq", lambda s=split: mcq_accuracy(model, tokenizer, self.mcq[s], size, budget, prob=True))
                for split in splits]

    def probe(self, model: Any, tokenizer: Any, settings: Any) -> dict[str, float]:
        """MCQ accuracy and Prob on the forget facts: what train.stop_at needs, in a fraction of a full evaluation."""
        model.eval()
        metrics = run_steps(self._mcq_steps(model, tokenizer, settings, ("forget",)), progress=False)
        return {k: v for k, v in metrics.items() if k.count("/") == 1}  # the per-attribute breakdown is left out

    def membership(self) -> Membership:
        """The forget facts' QA pairs (taught to the target) against the holdout facts' (never taught)."""
        return Membership(self.qa["forget"], self.qa["holdout"], "forget vs holdout QA pairs (answer tokens)")

    def relearn_plan(self, domain: str, samples: int | None, seed: int) -> RelearnPlan:
        """The forget facts are split (seeded): the attack fine-tunes on one part (or, out-of-domain, on the
        retain facts) and recovery is measured on the other, which it never saw. QA pair i and MCQ i of a
        split ask about the same fact, so a held-out index holds the fact out of both."""
        used, unseen = split_items(len(self.forget), samples, seed, "forget facts")
        unseen_mcq = [self.mcq["forget"][i] for i in unseen]

        def probe(model: Any, tokenizer: Any, settings: Any) -> dict[str, float]:
            size, budget = settings.batch_size, settings.max_batch_tokens
            forget = mcq_accuracy(model, tokenizer, unseen_mcq, size, budget, prob=True)
            return {"forget_unseen_acc": forget["acc"], "forget_unseen_prob": forget["prob"],
                    "retain_acc": mcq_accuracy(model, tokenizer, self.mcq["retain"], size, budget)["acc"]}

        train = [self.forget[i] for i in used] if domain == "forget" else list(self.retain)
        return RelearnPlan(train=train, probe=probe, probe_metrics=UNSEEN,
                           measured_on="forget facts not used for relearning",
                           details={"used_forget_indices": used, "unseen_forget_indices": unseen},
                           items=ItemSubset(UNSEEN_ITEMS, unseen))


@dataclass
class PrepareSettings:
    """The fine-tuning that turns the base model into the target model (configs/benchmark/embedded.yaml); an
    embedded model may bring defaults of its own (`EmbeddedModel.prepare` in unlearn/compute/models.py)."""

    epochs: int = setting(8, limit=AT_LEAST_ONE)
    lr: float = setting(1e-4, limit=POSITIVE)
    batch_size: int = setting(16, limit=AT_LEAST_ONE)


@dataclass(frozen=True)
class EmbeddedSettings(SyntheticSettings):
    """The `benchmark` section of the embedded benchmark (configs/benchmark/embedded.yaml): the world's sizes,
    and `prepare`, the fine-tuning that teaches the base model that world (read by `unlearn prepare`)."""

    prepare: dict[str, Any] | None = None


SIZE_KEYS = ("people", "cities", "organizations")


def world_settings(settings: EmbeddedSettings) -> SyntheticSettings:
    """The world's sizes, checked: counts given as YAML lists become tuples, and none may be negative."""
    from_mapping(PrepareSettings, settings.prepare, "benchmark.prepare")
    sizes = {key: tuple(getattr(settings, key)) for key in SIZE_KEYS}
    for key, counts in sizes.items():
        if min(counts) < 0:
            raise UserError(f"benchmark.{key} counts must be >= 0, got {list(counts)}")
    return SyntheticSettings(seed=settings.seed, **sizes)


def task_from(bench: World) -> TaskData:
    def pairs(split: str) -> list[Example]:
        return [Example(qa_prompt(f.question), " " + f.answer) for f in bench.facts[split]]

    forget, retain = pairs("forget"), pairs("retain")
    if not forget:
        raise UserError("the forget split is empty: nothing to unlearn (check benchmark.people/cities/...)")
    if not retain:
        raise UserError("the retain split is empty: utility cannot be measured")
    return TaskData(
        name="embedded", fingerprint=bench.fingerprint(), forget=forget, retain=retain,
        metrics=METRICS, needs_target=True, prepared_metrics=("forget/mcq_acc", "retain/mcq_acc", "holdout/mcq_acc"),
        mcq={s: [MCQ(qa_prompt(f.question), f.choices, f.answer_index, f.attribute, f.question, list(f.choices))
                 for f in bench.facts[s]]
             for s in SPLITS},
        qa={s: pairs(s) for s in SPLITS},
        passages=dict(bench.passages),
    )


@BENCHMARKS.register("embedded")
class Embedded(Benchmark):
    """Embedded: a synthetic world of facts; the base model is first fine-tuned to know them (offline)."""

    Settings = EmbeddedSettings

    def load(self, settings: EmbeddedSettings) -> TaskData:
        try:
            world = generate(world_settings(settings))
        except ValueError as err:
            raise UserError(str(err)) from None
        return task_from(world)

