"""Performance scripts: side-by-side timings printed as ratios (figures in docs/PERFORMANCE.md)."""
