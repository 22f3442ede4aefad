"""The embedded benchmark as the toolkit consumes it: training pairs and evaluation items.

Forget/retain training data are the QA pairs of those splits; evaluation uses MCQs on every split,
generated answers to the QA pairs, and the retain passages for perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchmarks.synthetic import SPLITS, Benchmark, SyntheticSettings, generate
from benchmarks.task import MCQ, Task
from unlearn.data import Example, qa_prompt
from unlearn.errors import UserError


@dataclass
class TaskData(Task):
    mcq: dict[str, list[MCQ]] = field(default_factory=dict)  # per split; tagged by the attribute asked about
    qa: dict[str, list[Example]] = field(default_factory=dict)
    passages: dict[str, list[str]] = field(default_factory=dict)

    def evaluate(self, model: Any, tokenizer: Any, settings: Any, progress: bool = True) -> dict[str, float]:
        from unlearn.evaluate import evaluate

        return evaluate(model, tokenizer, self, settings, progress=progress)


def settings_from(config: dict[str, Any]) -> SyntheticSettings:
    try:
        return SyntheticSettings(seed=int(config.get("seed", 0)),
                                 **{k: tuple(int(x) for x in config[k])
                                    for k in ("people", "cities", "organizations") if k in config})
    except (TypeError, ValueError) as err:
        raise UserError(f"bad embedded benchmark settings: {err}") from None


def task_from(bench: Benchmark) -> TaskData:
    def pairs(split: str) -> list[Example]:
        return [Example(qa_prompt(f.question), " " + f.answer) for f in bench.facts[split]]

    forget, retain = pairs("forget"), pairs("retain")
    if not forget:
        raise UserError("the forget split is empty: nothing to unlearn (check benchmark.people/cities/...)")
    if not retain:
        raise UserError("the retain split is empty: utility cannot be measured")
    return TaskData(
        name="embedded", fingerprint=bench.fingerprint(), forget=forget, retain=retain,
        forget_metrics=("forget/mcq_acc", "forget/rougeL"), needs_target=True,
        mcq={s: [MCQ(qa_prompt(f.question), f.choices, f.answer_index, f.attribute, f.question, list(f.choices))
                 for f in bench.facts[s]]
             for s in SPLITS},
        qa={s: pairs(s) for s in SPLITS},
        passages=dict(bench.passages),
    )


def load(config: dict[str, Any]) -> TaskData:
    try:
        bench = generate(settings_from(config))
    except ValueError as err:
        raise UserError(str(err)) from None
    return task_from(bench)
