"""The perf scripts run on the CPU in CI-sized form (their figures come from full-size runs: docs/PERFORMANCE.md),
and the scaling script judges issue 29's GPU targets only where they apply."""

from __future__ import annotations

import os
import subprocess
import sys

from unlearn.perf.scaling import target_lines


def test_scaling_runs_ci_sized_and_prints_its_ratios() -> None:
    env = {**os.environ, "UNLEARN_THREADS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "unlearn.perf.scaling", "--widths", "32", "--layers", "1",
                             "--vocab", "128", "--length", "16", "--batch", "2", "--steps", "1", "--repeats", "1",
                             "--optimizers", "adamw", "zo", "--device", "cpu"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 32 |")]
    assert len(rows) == 3  # adamw with and without checkpointing, zo once
    assert all("×" in row for row in rows)
    assert "are judged on a GPU only; this ran on cpu" in result.stdout


def test_gpu_targets_are_judged_per_row() -> None:
    rows = [{"optimizer": "zo", "grade": "zeroth-order", "width": 2048, "checkpointing": False,
             "step_over_forward": 2.46, "peak_over_inference": 1.00},
            {"optimizer": "adamw", "grade": "first-order", "width": 2048, "checkpointing": False,
             "step_over_forward": 3.1, "peak_over_inference": 5.4},
            {"optimizer": "adamw", "grade": "first-order", "width": 2048, "checkpointing": True,
             "step_over_forward": 4.1, "peak_over_inference": 4.1}]
    assert target_lines(rows, "cuda") == [
        "target zo width 2048: step ÷ forward 2.46x (at most 2.2x): MISSED",
        "target zo width 2048: peak ÷ inference 1.00x (at most 1.05x): met",
        "target adamw width 2048: step ÷ forward 3.10x (at most 3.5x): met"]
