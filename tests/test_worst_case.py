"""The worst case over a tampering grid: the grid's members, the maximum and its interval, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_BENCH, assert_user_error, cli
from unlearn.core.errors import UserError
from unlearn.evaluation.stats import Interval, bootstrap, recovery_interval, simultaneous_level, worst_case
from unlearn.recipes.worst_case import expand, read_grid, worst_record
from unlearn.storage.metrics import Metric
from unlearn.storage.records import AttackRecord, Recovery


def test_worst_case_by_hand() -> None:
    intervals = {"a": Interval(0.2, 0.1, 0.3, 10), "b": Interval(0.5, 0.3, 0.7, 10), "c": Interval(0.4, 0.35, 0.8, 10)}
    worst = worst_case(intervals)
    assert (worst.member, worst.value, worst.low, worst.high) == ("b", 0.5, 0.35, 0.8)
    assert worst.each_level == pytest.approx(1 - 0.05 / 3) == simultaneous_level(3)
    undefined = worst_case({**intervals, "d": Interval(0.1, float("nan"), float("nan"), 0)})
    assert undefined.member == "b" and np.isnan(undefined.low)  # an interval missing: no interval, not a narrower one


def test_the_interval_covers_the_largest_true_value() -> None:
    """Five members, four of them tied at the largest true rate: the member picked is the luckiest, so its own 95 %
    interval misses the truth more often than 5 %; the max-of-bounds interval at the Bonferroni level does not."""
    rng = np.random.default_rng(0)
    truth, rates, trials = 0.5, [0.3, 0.5, 0.5, 0.5, 0.5], 120
    covered, naive = 0, 0
    for _ in range(trials):
        samples = [rng.binomial(1, p, 40).astype(float) for p in rates]
        each = {str(i): bootstrap(s, level=simultaneous_level(5), resamples=400, seed=i) for i, s in enumerate(samples)}
        worst = worst_case(each)
        covered += worst.low <= truth <= worst.high
        picked = bootstrap(samples[int(worst.member)], resamples=400)
        naive += picked.low <= truth <= picked.high
    assert covered / trials >= 0.95 > naive / trials, (covered, naive)


def _member(name: str, unlearned: list[float], attacked: list[float]) -> tuple[AttackRecord, dict]:
    target = [1.0] * len(unlearned)
    mean = sum(unlearned) / len(unlearned)
    ratio = (sum(attacked) / len(attacked) - mean) / (1 - mean)
    rec = Recovery(metric="forget/mcq_acc", measured_on="forget/mcq_acc", ratio=ratio, note="ok", unlearned=mean,
                   attacked=sum(attacked) / len(attacked), target=1.0)
    return (AttackRecord(name, "quantize", {}, {"forget/mcq_acc": rec.attacked}, recovery=rec, recoveries=[rec]),
            {"recovery": {"forget/mcq_acc": {"target": target, "unlearned": unlearned, "attacked": attacked}}})


def test_worst_record_picks_the_largest_and_bounds_it() -> None:
    declared = [Metric("forget/mcq_acc", "forget", "lower", "forget")]
    a = _member("a", [0, 0, 1, 0] * 5, [1, 0, 1, 0] * 5)  # recovery 1/3
    b = _member("b", [0, 0, 0, 0] * 5, [1, 1, 0, 0] * 5)  # recovery 1/2
    record = worst_record("g", {"a": a, "b": b}, declared, seed=0)
    assert record.attack == "worst-g" and record.details["worst"] == "b"
    assert record.recovery.ratio == pytest.approx(0.5)
    level = simultaneous_level(2)
    each = [recovery_interval(*(m[1]["recovery"]["forget/mcq_acc"][k] for k in ("target", "unlearned", "attacked")),
                              level=level) for m in (a, b)]
    assert record.recovery.low == pytest.approx(max(i.low for i in each), abs=1e-4)
    assert record.recovery.high == pytest.approx(max(i.high for i in each), abs=1e-4)


def test_expand_a_grid_entry() -> None:
    members = expand("relearn", {"attack": "relearn", "steps": 3, "grid": {"lr": [1e-5, 2e-5], "lora": [False, True]}},
                     "grid member 1")
    assert [m.label for m in members] == ["relearn-lr1e-05-lorafalse", "relearn-lr1e-05-loratrue",
                                          "relearn-lr2e-05-lorafalse", "relearn-lr2e-05-loratrue"]
    assert all(m.settings.steps == 3 for m in members) and members[3].settings.lora is True
    with pytest.raises(UserError, match="lr given both as a setting and in its grid"):
        expand("r", {"attack": "relearn", "lr": 1e-5, "grid": {"lr": [2e-5]}}, "grid member 1")
    with pytest.raises(UserError, match="grid must map settings to non-empty lists"):
        expand("r", {"attack": "relearn", "grid": {"lr": 2e-5}}, "grid member 1")
    with pytest.raises(UserError, match="steps"):
        expand("r", {"attack": "relearn", "grid": {"steps": [0]}}, "grid member 1")  # every member checked


def test_grid_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nmembers:\n  - {attack: quantize, method: rtn, bits: 4}\n")
    with pytest.raises(UserError, match="at least two distinct members"):
        read_grid(path)
    path.write_text("name: g\nmember: []\n")
    with pytest.raises(UserError, match="unknown key"):
        read_grid(path)
    shipped = read_grid(Path(__file__).resolve().parents[1] / "configs" / "grids" / "tamper.yaml")
    assert len(shipped.members) == 8


def test_grid_attack_writes_members_and_the_worst_case(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir), *TINY_BENCH,
              "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "-q", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    folder = tmp_path / "runs" / "npo-adamw"
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: small\nmembers:\n"
                    "  - {attack: relearn, steps: 2, batch_size: 2, checkpoints: [0, 2], grid: {lr: [1.0e-4, 1.0e-3]}}"
                    "\n"
                    "  - {attack: quantize, method: rtn, bits: 4}\n")
    result = cli("attack", "--run", str(folder), "--grid", str(grid), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    worst = json.loads((folder / "attacks" / "worst-small" / "metrics.json").read_text())
    members = worst["details"]["members"]
    assert [m["member"] for m in members] == ["relearn-steps2-lr0.0001-batchsize2", "relearn-steps2-lr0.001-batchsize2",
                                              "rtn-4bit-channel"]
    for m in members:
        assert (folder / "attacks" / m["attack"] / "metrics.json").is_file()
    # The tiny model forgets nothing in 3 steps, so no member has a recovery to compare: said, not made up.
    assert all(m["ratio"] is None for m in members) and worst["recovery"]["ratio"] is None
    assert "no member has a defined recovery" in worst["recovery"]["note"]
    assert "worst case over 3 attacks" in result.stdout
    again = cli("attack", "--run", str(folder), "--grid", str(grid), "-q", cwd=tmp_path)  # resumes: nothing re-run
    assert again.returncode == 0 and again.stdout.count("done before") == 3, again.stdout
    report = cli("report", "runs", cwd=tmp_path)
    assert report.returncode == 0 and "| worst-small | worst |" in report.stdout, report.stdout


def test_grid_errors_are_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nmembers:\n  - {attack: nope}\n  - {attack: quantize}\n")
    result = cli("attack", "--model", str(tiny_model_dir), "--grid", str(grid), cwd=tmp_path)
    assert_user_error(result, "nope", tmp_path)
    result = cli("attack", "--model", str(tiny_model_dir), "--grid", str(grid), "--relearn", cwd=tmp_path)
    assert_user_error(result, "choose one attack", tmp_path)
