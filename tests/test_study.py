"""`unlearn study` on a tiny model: the grid, the outputs, bad input, and a study killed mid-way and restarted that
finishes without redoing complete cells; and the aggregation on a hand-made table whose answers are known."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import cli, sigint_as_in_a_terminal
from unlearn.core.errors import UserError
from unlearn.recipes.study.calibration import Trial, choose
from unlearn.recipes.study.results import (
    CellResult,
    attacked_by,
    mean_of,
    metric_aggregate,
    metric_rows,
    paired_difference,
    ratio_of,
    recovery_aggregate,
    recovery_rows,
    results_rows,
    worst_aggregate,
    worst_difference,
)
from unlearn.storage.metrics import Metric
from unlearn.storage.records import AttackRecord, Recovery, RunRecord, read_run
from unlearn.storage.runs import MARKER
from unlearn.training.config import read_yaml

BENCH = {"name": "embedded", "people": [2, 2, 4], "cities": [1, 1, 2], "organizations": [1, 1, 2],
         "prepare": {"epochs": 1}}


def _study(tmp_path: Path, model: Path, **changes) -> Path:
    study = {"name": "tiny", "output_dir": str(tmp_path / "studies"), "seeds": [0, 1],
             "run": {"model": str(model), "benchmark": BENCH, "eval": {"max_new_tokens": 2},
                     "train": {"max_steps": 3, "batch_size": 2, "eval_every": 1,
                               "stop_at": "forget/mcq_acc <= 0.05"}},
             "attack_unmatched": True,  # the tiny model never reaches the level; its attacks are what is tested
             "methods": {"npo": None}, "optimizers": {"adamw": {}, "fast": {"name": "adamw", "lr": 1e-4}},
             "attacks": {"rtn4": {"attack": "quantize", "method": "rtn", "bits": 4},
                         "relearn": {"attack": "relearn", "steps": 2, "checkpoints": [0, 2]}}} | changes
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_a_study_runs_its_grid_and_summarizes_it(tmp_path, tiny_model_dir):
    result = cli("study", str(_study(tmp_path, tiny_model_dir)), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "studies/tiny"
    runs = sorted(p.name for p in (folder / "runs").iterdir() if not p.name.startswith("."))
    assert runs == ["npo-adamw-s0", "npo-adamw-s1", "npo-fast-s0", "npo-fast-s1"]
    assert sorted(p.name for p in (folder / "runs/npo-fast-s1/attacks").iterdir()) == ["relearn-steps2",
                                                                                        "rtn-4bit-channel"]
    rows = (folder / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 3  # header, then per cell: the unlearned model and two attacks
    header = rows[0].split(",")
    fast = [dict(zip(header, r.split(","), strict=False)) for r in rows[1:] if ",fast," in r]
    assert {r["lr"] for r in fast} == {"0.0001"} and {r["attack"] for r in fast} == {"none", "rtn4", "relearn"}
    summary = (folder / "summary.md").read_text()
    assert "## Recovery after `rtn4`" in summary and "## Compared with `adamw`" in summary
    assert "never reached `forget/mcq_acc <= 0.05`" in summary  # the tiny model cannot: said, not hidden
    assert "Their attacks are shown" in summary and "attacks them anyway" not in summary  # attack_unmatched: true
    for image in ("recovery_vs_forget.png", "relearn_curves.png", "utility_vs_forget.png"):
        assert (folder / image).stat().st_size > 1000 and f"]({image})" in summary
    again = cli("study", str(_study(tmp_path, tiny_model_dir)), "-q", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 4 * 3


def test_a_killed_study_continues_without_redoing_complete_cells(tmp_path, tiny_model_dir):
    path = _study(tmp_path, tiny_model_dir, seeds=[0, 1, 2])
    env = {**os.environ, "UNLEARN_CACHE": str(tmp_path / "cache"), "UNLEARN_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "unlearn", "study", str(path), "-q"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "studies/tiny/runs"
    first = runs / "npo-adamw-s0"
    deadline = time.monotonic() + 300
    while not (first / "attacks/rtn-4bit-channel/metrics.json").is_file():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way: the first cell's run and one of its attacks are done
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in [first / "metrics.json", first / "attacks/rtn-4bit-channel/metrics.json"]}
    result = cli("study", str(path), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[1/6] npo-adamw-s0: run complete, skipped" in result.stdout
    assert "[1/6] npo-adamw-s0: rtn4 complete, skipped" in result.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # not redone
    assert len([p for p in runs.iterdir() if (p / "metrics.json").is_file()]) == 6
    # The killed run's staging folder is gone, unless the kill came before its marker was written: such a folder
    # may be a live writer's for a minute (unlearn/storage/runs.py) and is cleaned by a later run.
    assert not [p for p in runs.iterdir() if p.name.startswith(".staging") and (p / MARKER).exists()]


def _results_without_timings(folder: Path) -> list[dict[str, str]]:
    rows = (folder / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    return [{k: v for k, v in zip(header, r.split(","), strict=False) if "seconds" not in k} for r in rows[1:]]


def test_workers_run_cells_at_once_with_the_same_results(tmp_path, tiny_model_dir):
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    # One thread per run either way (2 threads over 2 workers), and one target model (the serial study prepares
    # it, the cache hands it to the other), so the results must agree to the last digit.
    cache = {"UNLEARN_CACHE": str(tmp_path / "cache")}
    serial = cli("study", str(_study(tmp_path / "one", tiny_model_dir)), "-q", cwd=tmp_path / "one",
                 env={"UNLEARN_THREADS": "1", **cache}, separate_process=True)
    assert serial.returncode == 0, serial.stderr
    parallel = cli("study", str(_study(tmp_path / "two", tiny_model_dir)), "-q", "--workers", "2",
                   cwd=tmp_path / "two", env={"UNLEARN_THREADS": "2", **cache}, separate_process=True)
    assert parallel.returncode == 0, parallel.stderr
    assert "2 workers, 1 CPU thread(s) each" in parallel.stdout
    assert "preparing the starting model" in parallel.stdout  # once, before the workers start
    assert parallel.stdout.count("attack relearn") == 4 and parallel.stdout.count(": unlearning (") == 4
    one, two = tmp_path / "one/studies/tiny", tmp_path / "two/studies/tiny"
    assert _results_without_timings(one) == _results_without_timings(two)
    assert (two / "summary.md").is_file()


def test_an_interrupted_study_with_workers_stops_them_and_fails(tmp_path, tiny_model_dir):
    path = _study(tmp_path, tiny_model_dir, seeds=[0, 1, 2])
    env = {**os.environ, "UNLEARN_CACHE": str(tmp_path / "cache"), "UNLEARN_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "unlearn", "study", str(path), "-q", "--workers", "2"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_in_a_terminal)
    runs = tmp_path / "studies/tiny/runs"
    deadline = time.monotonic() + 300
    while not any(runs.glob("*/attacks/*/metrics.json")):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # The cells begun by now: complete, or being made in a staging folder ".staging-<cell>-<8 hex>".
    begun = {p.name.removeprefix(".staging-").rsplit("-", 1)[0] if p.name.startswith(".staging-") else p.name
             for p in runs.iterdir()}
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    # No cell queued behind them was made: a stopped worker used to take the next one from the pool's queue, and
    # the study waited for it before it exited.
    finished = {p.name for p in runs.iterdir() if (p / "metrics.json").is_file()}
    assert finished <= begun, finished - begun
    written = {p: p.stat().st_mtime_ns for p in runs.glob("**/metrics.json")}
    time.sleep(3)  # the workers are stopped with the study: nothing more is written
    assert {p: p.stat().st_mtime_ns for p in runs.glob("**/metrics.json")} == written
    assert len([p for p in runs.iterdir() if (p / "metrics.json").is_file()]) < 6
    result = cli("study", str(path), "-q", "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len([p for p in runs.iterdir() if (p / "metrics.json").is_file()]) == 6


def test_a_finished_cell_with_other_settings_is_refused(tmp_path, tiny_model_dir):
    assert cli("study", str(_study(tmp_path, tiny_model_dir, seeds=[0])), "-q", cwd=tmp_path).returncode == 0
    changed = _study(tmp_path, tiny_model_dir, seeds=[0], optimizers={"adamw": {"lr": 3e-5}})
    result = cli("study", str(changed), "-q", cwd=tmp_path)
    assert result.returncode == 2 and "was run with other settings" in result.stderr


@pytest.mark.parametrize(("changes", "message"), [
    ({"seeds": [0, 0]}, "distinct integers"),
    ({"optimizers": {}}, "names no optimizers"),
    ({"optimizers": {"adamw": {"lr": -1}}}, "optimizer.lr must be a finite number >= 0, got -1"),
    ({"attacks": {"x": {"attack": "nope"}}}, "unknown attack 'nope'"),
    ({"attacks": {"x": {"attack": "quantize", "bits": 5}}}, "supports"),
    ({"methods": {"../up": None}}, "plain folder name"),
    ({"compare_to": "sgd"}, "compare_to 'sgd' is not one of the optimizers"),
    ({"bogus": 1}, "unknown key(s) in 'study': bogus"),
    ({"calibration_seed": 1}, "not one of the seeds"),
    ({"optimizers": {"adamw": {"calibrate": {"lr": [1e-5]}}}}, "at least two distinct positive numbers"),
    ({"optimizers": {"adamw": {"calibrate": {"lr": [1e-5, 2e-5], "betas": [0.9, 0.8]}}}}, "one option"),
    ({"optimizers": {"adamw": {"calibrate": {"lr": [1e-5, -1.0]}}}}, "positive numbers"),
    ({"optimizers": {"adamw": {"calibrate": {"lr": [1e-5, 1.0000001e-5]}}}}, "too close to name"),
    ({"optimizers": {"adamw": {"calibrate": {"../lr": [1e-5, 2e-5]}}}}, "dotted path"),
    ({"methods": {"npo": {"calibrate": {"beta": [0.1, 0.2]}}}}, "only optimizers can be calibrated"),
    ({"optimizers": {"adamw": {"calibrate": {"lr": [1e-5, 2e-5]}}},
      "run": {"train": {"max_steps": 2}}}, "needs train.stop_at"),
    ({"worst_case": {"w": ["rtn4", "nope"]}}, "study worst_case 'w' names unknown attack label(s) nope"),
    ({"worst_case": {"w": ["rtn4"]}}, "needs at least two distinct attacks"),
    ({"attacks": {"r": {"attack": "relearn", "grid": {"lr": 1e-5}}}}, "grid must map settings to non-empty lists"),
    ({"methods": {"npo": {"optimizers": ["nope"]}}}, "optimizers nope are not in the study's optimizers"),
    ({"methods": {"npo": {"optimizers": "adamw"}}}, "'optimizers' must be a list of optimizer labels"),
    ({"contrasts": [["npo/adamw"]]}, "each must be two different METHOD/OPTIMIZER labels"),
    ({"contrasts": [["npo/adamw", "rmu/adamw"]]}, "rmu/adamw is not a method/optimizer of the study"),
])
def test_bad_study_input_fails_in_one_line_before_anything_runs(tmp_path, tiny_model_dir, changes, message):
    result = cli("study", str(_study(tmp_path, tiny_model_dir, **changes)), "-q", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "studies").exists()


# ------------------------------------------------------------------------------------------------ hand-made table

FORGET = Metric("forget/mcq_acc", "forget", "lower", "forget")
RETAIN = Metric("retain/mcq_acc", "retain", "higher", "utility")


def _cell(optimizer: str, seed: int, forget: list[float], attacked: list[float]) -> CellResult:
    target = [1.0] * len(forget)
    record = RunRecord("npo", optimizer, "embedded", FORGET.key, {FORGET.key: float(np.mean(forget)),
                                                                   RETAIN.key: 0.9},
                       [FORGET, RETAIN], train={"steps": 10, "reached": True}, target={FORGET.key: 1.0})
    ratio = (np.mean(attacked) - np.mean(forget)) / (1.0 - np.mean(forget))
    attack = AttackRecord("rtn-4bit-channel", "quantize", {}, {FORGET.key: float(np.mean(attacked))},
                          recovery=Recovery(FORGET.key, FORGET.key, float(ratio), "ok"),
                          recoveries=[Recovery(FORGET.key, FORGET.key, float(ratio), "ok")])
    items = {"recovery": {FORGET.key: {"target": target, "unlearned": forget, "attacked": attacked}}}
    return CellResult(f"npo-{optimizer}-s{seed}", "npo", optimizer, seed, record, {"optimizer": {"lr": 1e-5}},
                      {"unlearned": {FORGET.key: forget}, "target": {FORGET.key: target}},
                      {"q4": (attack, items)})


def test_aggregation_of_a_hand_made_table():
    """Two optimizers × three seeds on 200 items. "a": 30 % of items still known, the attack brings back 20 % more
    (ratio 2/7 every seed); "b": the same forgetting, nothing comes back (ratio 0). The means, their intervals, the
    rows of results.csv and the paired verdicts follow."""
    n = 200
    forget = [1.0 if i % 10 < 3 else 0.0 for i in range(n)]
    back = [1.0 if i % 10 < 5 else 0.0 for i in range(n)]
    a = [_cell("a", s, forget, back) for s in range(3)]
    b = [_cell("b", s, forget, forget) for s in range(3)]
    level = metric_aggregate(a, FORGET.key)
    assert level is not None and level.interval.value == pytest.approx(0.3) and level.interval.n == 3
    assert level.interval.low < 0.3 < level.interval.high and level.items
    rec_a, rec_b = recovery_aggregate(a, "q4", FORGET.key), recovery_aggregate(b, "q4", FORGET.key)
    assert rec_a is not None and rec_b is not None
    assert rec_a.interval.value == pytest.approx(2 / 7) and rec_a.per_seed == pytest.approx([2 / 7] * 3)
    assert rec_b.interval.value == 0.0 and rec_b.interval.low == rec_b.interval.high == 0.0
    diff = paired_difference(b, a, recovery_rows("q4", FORGET.key), ratio_of("lower"))
    assert diff is not None and diff.interval.value == pytest.approx(-2 / 7) and diff.verdict == "lower (beyond noise)"
    same = paired_difference(b, a, metric_rows(FORGET.key), mean_of)
    assert same is not None and same.interval.value == 0.0 and same.verdict == "within noise"
    rows = results_rows(a + b, ["q4"])
    assert len(rows) == 12 and {r["attack"] for r in rows} == {"none", "q4"}
    q4 = [r for r in rows if r["attack"] == "q4" and r["optimizer"] == "a"]
    assert all(r["recovery forget/mcq_acc"] == pytest.approx(2 / 7) and r["lr"] == "1e-05" for r in q4)
    assert json.dumps(rows)  # plain values only: what csv and json can hold


def test_a_cell_that_missed_the_level_leaves_out_its_seed_not_the_group():
    """As above, but "b"'s seed 1 missed the level and was not attacked (Gemma's SAM-NPO, seed 1): b's recovery is
    its two attacked seeds' (n = 2), and the paired recovery difference pairs those two seeds; the level difference
    still pairs all three. A cell attacked without per-item rows still makes its difference undefined."""
    n = 200
    forget = [1.0 if i % 10 < 3 else 0.0 for i in range(n)]
    back = [1.0 if i % 10 < 5 else 0.0 for i in range(n)]
    a = [_cell("a", s, forget, back) for s in range(3)]
    b = [_cell("b", s, forget, forget) for s in range(3)]
    b[1].attacks.clear()
    rec_b = recovery_aggregate(b, "q4", FORGET.key)
    assert rec_b is not None and rec_b.interval.n == 2 and rec_b.interval.value == 0.0
    diff = paired_difference(b, a, recovery_rows("q4", FORGET.key), ratio_of("lower"), attacked_by("q4"))
    assert diff is not None and diff.interval.n == 2 and diff.interval.value == pytest.approx(-2 / 7)
    level = paired_difference(b, a, metric_rows(FORGET.key), mean_of)
    assert level is not None and level.interval.n == 3
    record, items = a[0].attacks["q4"]
    a[0].attacks["q4"] = (record, {})  # attacked, but its per-item values are gone
    assert paired_difference(b, a, recovery_rows("q4", FORGET.key), ratio_of("lower"), attacked_by("q4")) is None


def test_worst_case_of_a_hand_made_table():
    """As above with a second attack: "q8" brings back 40 % of what was removed for "a" (more than q4's 2/7), nothing
    for "b". The worst case of "a" is q8, its interval the max of the members' Bonferroni bounds, and "b" is
    lower on it beyond noise."""
    n = 200
    forget = [1.0 if i % 10 < 3 else 0.0 for i in range(n)]
    q4_back = [1.0 if i % 10 < 5 else 0.0 for i in range(n)]
    q8_back = [1.0 if i % 20 < 11 else 0.0 for i in range(n)]  # 55 % known: (0.55 - 0.3) / 0.7
    a = [_cell("a", s, forget, q4_back) for s in range(3)]
    b = [_cell("b", s, forget, forget) for s in range(3)]
    for cell, back in [*((c, q8_back) for c in a), *((c, forget) for c in b)]:
        record, items = cell.attacks["q4"]
        ratio = (np.mean(back) - 0.3) / 0.7
        cell.attacks["q8"] = (AttackRecord("bnb-8bit", "quantize", {}, {}, recovery=Recovery(FORGET.key, FORGET.key,
                                                                                             float(ratio), "ok")),
                              {"recovery": {FORGET.key: {**items["recovery"][FORGET.key], "attacked": back}}})
    worst = worst_aggregate(a, ["q4", "q8"])
    assert worst.worst is not None and worst.worst.member == "q8" and worst.worst.value == pytest.approx(0.25 / 0.7)
    members = [worst.members[k].interval for k in ("q4", "q8")]
    assert worst.worst.low == max(i.low for i in members) and worst.worst.high == max(i.high for i in members)
    assert members[1].level == pytest.approx(0.975)  # two members: each at 1 - 0.05 / 2
    diff = worst_difference(b, a, ["q4", "q8"])
    assert diff is not None and diff.interval.value == pytest.approx(-0.25 / 0.7)
    assert diff.verdict == "lower (beyond noise)"


def test_a_study_compares_on_the_worst_case(tmp_path, tiny_model_dir):
    path = _study(tmp_path, tiny_model_dir, seeds=[0],
                  attacks={"rtn": {"attack": "quantize", "method": "rtn", "grid": {"bits": [4, 8]}}},
                  worst_case={"rounding": ["rtn"]})
    result = cli("study", str(path), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "studies/tiny"
    assert sorted(p.name for p in (folder / "runs/npo-adamw-s0/attacks").iterdir()) == ["rtn-4bit-channel",
                                                                                        "rtn-8bit-channel"]
    summary = (folder / "summary.md").read_text()
    assert "## Worst case `rounding`" in summary and "| rtn-bits4 | rtn-bits8 |" in summary


def test_a_method_paired_with_one_optimizer_and_contrasted_across_methods(tmp_path, tiny_model_dir):
    path = _study(tmp_path, tiny_model_dir, seeds=[0], methods={"npo": None, "sam-npo": {"optimizers": ["adamw"]}},
                  attacks={"rtn4": {"attack": "quantize", "method": "rtn", "bits": 4}},
                  contrasts=[["sam-npo/adamw", "npo/fast"]])
    result = cli("study", str(path), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "studies/tiny"
    runs = sorted(p.name for p in (folder / "runs").iterdir() if not p.name.startswith("."))
    assert runs == ["npo-adamw-s0", "npo-fast-s0", "sam-npo-adamw-s0"]  # no sam-npo × fast cell
    summary = (folder / "summary.md").read_text()
    contrasts = summary.partition("## Contrasts across methods")[2]
    assert "| sam-npo/adamw | npo/fast | forget ↓ (unlearned) |" in contrasts, summary
    assert "| sam-npo/adamw | npo/fast | recovery on" in contrasts


def test_runs_that_miss_the_level_are_not_attacked_by_default(tmp_path, tiny_model_dir):
    path = _study(tmp_path, tiny_model_dir, seeds=[0], optimizers={"adamw": {}}, attack_unmatched=False)
    result = cli("study", str(path), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "never reached train.stop_at: not attacked" in result.stdout
    assert not (tmp_path / "studies/tiny/runs/npo-adamw-s0/attacks").exists()
    summary = (tmp_path / "studies/tiny/summary.md").read_text()
    assert "They are not attacked, since they are not at the matched level" in summary


# ------------------------------------------------------------------------------------------------ calibration


def _trial(value: float, reached: bool, forget: float, retain: float, steps: int = 10, collapse: bool = False) -> Trial:
    record = RunRecord("npo", "adamw", "embedded", FORGET.key, {FORGET.key: forget, RETAIN.key: retain},
                       [FORGET, RETAIN], train={"steps": steps, "reached": reached,
                                                "stop_at": "forget/mcq_acc <= 0.4"},
                       collapse=["retain collapsed"] if collapse else [])
    return Trial(value, record)


def test_calibration_keeps_the_value_that_reaches_the_level_with_the_best_utility():
    # The best retain of all (0.99) did not reach the level; 0.95 collapsed: 3e-5 (retain 0.9) is kept.
    trials = [_trial(1e-5, False, 0.6, 0.99), _trial(2e-5, True, 0.35, 0.8), _trial(3e-5, True, 0.3, 0.9),
              _trial(4e-5, True, 0.2, 0.95, collapse=True)]
    choice = choose(trials)
    assert (choice.value, choice.by, choice.reached) == (3e-5, RETAIN.key, True)
    # equal utility: fewer steps, then the smaller value
    assert choose([_trial(2e-5, True, 0.3, 0.9, steps=20), _trial(4e-5, True, 0.3, 0.9, steps=10)]).value == 4e-5
    assert choose([_trial(2e-5, True, 0.3, 0.9), _trial(4e-5, True, 0.3, 0.9)]).value == 2e-5
    # by another metric: the forget level itself (lower is better)
    assert choose(trials[:3], by=FORGET.key).value == 3e-5
    with pytest.raises(UserError, match="calibrate_by 'retain/nope'"):
        choose(trials, by="retain/nope")
    # none reached: the one closest to 0.4, said to be unmatched
    closest = choose([_trial(1e-5, False, 0.9, 0.99), _trial(2e-5, False, 0.5, 0.9), _trial(3e-5, False, 0.2, 0.1,
                                                                                              collapse=True)])
    assert (closest.value, closest.reached) == (2e-5, False) and "no value reached" in closest.reason


def test_a_calibrated_optimizer_runs_its_trials_on_their_own_seed_and_its_cells_with_the_choice(tmp_path,
                                                                                              tiny_model_dir):
    grid = [1e-5, 1e-3]
    path = _study(tmp_path, tiny_model_dir, seeds=[0], attacks={},
                  run={"model": str(tiny_model_dir), "benchmark": BENCH, "eval": {"max_new_tokens": 2},
                       "train": {"max_steps": 3, "batch_size": 2, "eval_every": 1, "stop_at": "forget/mcq_acc <= 1.0"}},
                  optimizers={"adamw": {"calibrate": {"lr": grid}}})
    result = cli("study", str(path), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "studies/tiny"
    trials = [folder / "calibration" / f"npo-adamw-lr{v:g}" for v in grid]
    assert all(read_yaml(t / "config.yaml")["train"]["seed"] == 1 for t in trials)  # not the compared seed 0
    assert [read_yaml(t / "config.yaml")["optimizer"]["lr"] for t in trials] == grid
    choice = choose([Trial(v, read_run(t / "metrics.json")) for v, t in zip(grid, trials, strict=True)])
    assert read_yaml(folder / "runs/npo-adamw-s0/config.yaml")["optimizer"]["lr"] == choice.value
    summary = (folder / "summary.md").read_text()
    assert "## Calibration" in summary and summary.count("✓") == 1 and f"lr {choice.value:g}" in summary
    assert f"adamw: lr = {choice.value:g}" in result.stdout
    again = cli("study", str(path), "-q", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("run complete, skipped") == 3  # two trials and the cell


@pytest.mark.parametrize("name", ["downgrade", "downgrade-worst", "gemma", "gpu"])
def test_the_shipped_study_files_plan_and_check_every_cell(name: str) -> None:
    """Every cell's settings are checked when the plan is made (no model loads): a shipped file that names an
    unknown option or an impossible precision fails here, not after an hour on a GPU."""
    from unlearn.recipes.study.plan import load_study

    study = load_study(Path(__file__).resolve().parents[1] / "configs" / "study" / f"{name}.yaml")
    pairs = sum(m.pairs_with(o) for m in study.methods for o in study.optimizers)
    assert len(study.cells) == pairs * len(study.settings.seeds)
    if name == "gemma":  # the core comparison, and the defence with AdamW only
        assert sorted(c.name for c in study.cells if c.seed == 0) == [
            "npo-adamw-s0", "npo-hybrid-s0", "npo-signsgd-s0", "sam-npo-adamw-s0"]
        assert all(study.configs[c.name].model == "gemma3-270m" for c in study.cells)
    if name == "gpu":
        assert len(study.settings.seeds) >= 3 and {m.label for m in study.methods} == {"npo", "graddiff"}
        zo = study.configs[next(c.name for c in study.cells if c.optimizer.label == "zo")]
        assert zo.train.max_steps >= 5000 and zo.train.save_every > 0


def test_a_second_study_on_the_same_folder_is_refused_before_it_trains(tmp_path, tiny_model_dir):
    """Two `unlearn study` on one file: the second used to train a duplicate cell, fail, and leave a stray
    `runs/npo-adamw-s0-2`. Now it is refused at once while the first holds the study folder."""
    from unlearn.storage.locks import claim

    path = _study(tmp_path, tiny_model_dir, seeds=[0])
    folder = tmp_path / "studies" / "tiny"
    with claim(folder):  # what a live study holds for its whole length
        result = cli("study", str(path), "-q", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {folder} is being written by another process (pid {os.getpid()}); wait for it to finish or "
        "choose another name"]
    assert not folder.exists()
