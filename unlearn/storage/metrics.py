"""A metric's declaration: what a recorded number measures and which way is better.

Benchmarks declare their metrics; records store the declarations beside the numbers, so a report reads a run
folder without importing the benchmark that wrote it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

ROLES = ("forget", "utility", "info")
BETTER = ("lower", "higher", "zero", "none")  # "zero": closest to 0 is best (MUSE's PrivLeak)
ARROWS = {"lower": " ↓", "higher": " ↑", "zero": " (→0)", "none": ""}


@dataclass(frozen=True)
class Metric:
    """One declared metric. `better` is the direction a *good unlearned model* moves it: a forget metric
    (knowledge that should be gone) is better lower, a utility metric higher. A declared key also covers the
    keys that extend it ("wmdp/acc" covers the per-concept "wmdp/acc/virology")."""

    key: str
    title: str
    better: str
    role: str
    unit: str = ""
    chance: float | None = None  # what guessing scores (4-option MCQ: 0.25): a utility below it is a collapse

    def __post_init__(self) -> None:
        if self.better not in BETTER or self.role not in ROLES:
            raise ValueError(f"metric {self.key!r}: better must be one of {BETTER} and role one of {ROLES}")

    @property
    def heading(self) -> str:
        """Column title: the title, its direction, and its scale where that is not 0-1."""
        return self.title + ARROWS[self.better]

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def declaration(metrics: tuple[Metric, ...] | list[Metric], key: str) -> Metric | None:
    """The declaration of `key`: its own, else that of the longest declared key it extends."""
    return max((m for m in metrics if key == m.key or key.startswith(m.key + "/") or key.startswith(m.key + "_")),
               key=lambda m: len(m.key), default=None)
