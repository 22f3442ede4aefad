"""Benchmarks: each turns its config section into a Task (training text + how to score a model).

A new benchmark is one module with a `load(config) -> Task` function (unlearn/task.py), registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from unlearn.benchmarks import embedded, muse, wmdp
from unlearn.task import Task

BENCHMARKS: dict[str, Callable[[dict[str, Any]], Task]] = {
    "embedded": embedded.load, "wmdp": wmdp.load, "openqa": wmdp.load_openqa, "muse": muse.load}
