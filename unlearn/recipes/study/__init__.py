"""`unlearn study`: the plan (grid, seeds, matched forget level), the workers that run its cells, calibration,
the per-cell results and the summary with intervals."""
