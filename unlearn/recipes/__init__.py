"""Recipes: orchestration on top of the library, the benchmarks and the attacks (run, prepare, attack, report)."""
