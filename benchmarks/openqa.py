"""The `openqa` benchmark: WMDP-style questions asked open-ended (no choices shown), each answer judged by
normalized match or an NLI model (unlearn/evaluation/judge.py), beside the same questions' MCQ accuracy.

Its data, settings and scoring are WMDP's (benchmarks/wmdp.py); only the headline differs: open-ended accuracy."""

from __future__ import annotations

from unlearn.benchmarks.wmdp import WMDP
from unlearn.tasks.task import BENCHMARKS


@BENCHMARKS.register("openqa")
class OpenQA(WMDP):
    """The same questions asked open-ended (no choices shown), judged by normalized match or an NLI model."""

    name = "openqa"
    open_ended = True
