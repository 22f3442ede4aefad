"""Storage of runs and records: run folders renamed into place whole, the locks that guard them, the records
(metrics, attacks, items) read back as checked data, and training checkpoints."""
