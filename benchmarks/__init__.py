"""Benchmarks: each turns its config section into a TaskData (training pairs + evaluation items).

A new benchmark is one module with a `load(config) -> TaskData` function, registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks import embedded

BENCHMARKS: dict[str, Callable[[dict[str, Any]], embedded.TaskData]] = {"embedded": embedded.load}
