"""tools/sweep.py's reading of log.jsonl: the ZO-block retain changes it tabulates for issue-style sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_tool


@pytest.fixture(scope="module")
def sweep():
    return load_tool("sweep")


def write_log(path: Path, grades: list[str], retain: list[float], probes: dict[int, float], end: float) -> Path:
    lines = []
    for i, (grade, value) in enumerate(zip(grades, retain, strict=True)):
        record = {"step": i + 1, "grade": grade, "parts": {"forget": 1.0, "retain": value}}
        if i in probes:
            record["probe"] = {"forget": 1.0, "retain": probes[i], "total": 1.0 + probes[i]}
        if i == len(grades) - 1:
            record["probe_end"] = {"forget": 1.0, "retain": end, "total": 1.0 + end}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_zo_block_changes_from_step_batches_and_from_fixed_probe_rows(sweep, tmp_path: Path) -> None:
    fo, zo = "first-order", "zeroth-order"
    log = write_log(tmp_path / "log.jsonl", [fo, fo, zo, zo, zo, zo, fo, fo, zo, zo],
                    [9.0, 9.0, 1.0, 1.0, 2.0, 2.0, 9.0, 9.0, 4.0, 2.0],
                    probes={0: 0.5, 2: 1.0, 6: 0.8, 8: 2.0}, end=1.0)
    # Step batches: each ZO block's second half against its first half (the FO steps around it do not count).
    assert sweep.zo_block_rises(sweep.read_log(log)) == pytest.approx([1.0, -0.5])
    # Fixed rows: the probe before each ZO block against the next probe (the last against probe_end).
    assert sweep.zo_block_probe_changes(sweep.read_log(log)) == pytest.approx([-0.2, -0.5])


def test_a_pure_zeroth_order_run_has_no_blocks(sweep, tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.jsonl", ["zeroth-order"] * 4, [1.0, 1.0, 3.0, 3.0], probes={}, end=1.0)
    assert sweep.zo_block_rises(sweep.read_log(log)) == [] and sweep.zo_block_probe_changes(sweep.read_log(log)) == []
