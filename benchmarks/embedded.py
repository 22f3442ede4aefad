"""The embedded benchmark as the toolkit consumes it: training pairs and evaluation items.

Forget/retain training data are the QA pairs of those splits; evaluation uses MCQs on every split,
generated answers to the QA pairs, and the retain passages for perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.synthetic import SPLITS, Benchmark, SyntheticSettings, generate
from unlearn.data import Example, qa_prompt
from unlearn.errors import UserError


@dataclass
class MCQ:
    prompt: str
    choices: list[str]
    answer_index: int
    tag: str  # the attribute asked about, for per-concept breakdowns


@dataclass
class TaskData:
    name: str
    fingerprint: str
    forget: list[Example]
    retain: list[Example]
    mcq: dict[str, list[MCQ]]
    qa: dict[str, list[Example]]
    passages: dict[str, list[str]]


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
        mcq={s: [MCQ(qa_prompt(f.question), f.choices, f.answer_index, f.attribute) for f in bench.facts[s]]
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
