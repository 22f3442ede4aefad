"""`train.stop_at`: end a run once a measured metric reaches a level, so runs are compared at matched efficacy.

A rule is one comparison, `forget/mcq_acc <= 0.30`: a metric key, one of <=, <, >=, >, and a number. It is parsed
(never evaluated as code: configs are untrusted input) when the config is read, and checked on the metrics the
benchmark's quick probe returns every `train.eval_every` steps.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from unlearn.core.errors import UserError, shown

_OPERATORS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, "<": operator.lt, ">=": operator.ge,
                                                         ">": operator.gt}
_RULE = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class StopRule:
    metric: str
    op: str
    level: float

    @classmethod
    def parse(cls, text: str) -> StopRule:
        match = _RULE.match(text) if isinstance(text, str) else None
        if match is None:
            raise UserError(f"train.stop_at must read 'METRIC OP NUMBER' with OP one of <=, <, >=, > "
                            f"(e.g. 'forget/mcq_acc <= 0.30'), got {shown(text)}")
        level = float(match.group(3))
        if not math.isfinite(level):
            raise UserError(f"train.stop_at needs a finite level, got {shown(text)}")
        return cls(match.group(1), match.group(2), level)

    def reached(self, metrics: dict[str, float]) -> bool:
        if self.metric not in metrics:
            raise UserError(f"train.stop_at: '{self.metric}' is not measured during training; the benchmark's "
                            f"probe measures: {', '.join(sorted(metrics)) or 'nothing'}")
        value = metrics[self.metric]
        return math.isfinite(value) and _OPERATORS[self.op](value, self.level)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.level:g}"
