"""Training: the run configuration, the unlearning methods and their registry, the loop, stopping rules, adapters."""
