"""Benchmark suites. Each module registers a `Benchmark` (its `Settings` and `load`) with
`@BENCHMARKS.register("name")` (unlearn/tasks/task.py); the registry imports every module of this package when it
is first read. See docs/EXTENDING.md."""
