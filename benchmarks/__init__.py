"""Benchmark suites. Each module registers a `load(config) -> Task` in `unlearn.tasks.task.BENCHMARKS`
(`@BENCHMARKS.register("name")`); importing this package registers them all. See docs/EXTENDING.md.
"""

from unlearn.benchmarks import embedded, muse, wmdp  # noqa: F401 - imported for their registrations
from unlearn.tasks.task import BENCHMARKS

__all__ = ["BENCHMARKS"]
