"""Benchmark suites. Each module registers a loader with `@BENCHMARKS.register("name")` (unlearn/tasks/task.py);
the registry imports every module of this package when it is first read. See docs/EXTENDING.md."""
