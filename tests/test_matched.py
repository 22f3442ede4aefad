"""Matched efficacy: train.eval_every measures during training, train.stop_at ends a run at a level; and attack
results of different settings and seeds live side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_BENCH, cli
from unlearn.core.errors import UserError
from unlearn.training.stopping import StopRule


def _run(tmp_path: Path, model: Path, *extra: str, name: str = "r"):
    return cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(model), "--steps", "6",
               "--batch-size", "2", "-q", *TINY_BENCH, "--name", name, *extra, cwd=tmp_path)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_stop_at_ends_the_run_at_the_first_measurement_that_meets_it(tmp_path, tiny_model_dir):
    result = _run(tmp_path, tiny_model_dir, "--set", "train.eval_every=2", "--set", "train.stop_at=forget/mcq_acc <= 1")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "runs/r/metrics.json").read_text())
    assert record["train"]["steps"] == 2 and record["train"]["stopped_at"] == 2 and record["train"]["reached"]
    assert record["train"]["stop_at"] == "forget/mcq_acc <= 1"
    log = _log(tmp_path / "runs/r")
    assert [r["step"] for r in log] == [1, 2] and "eval" in log[1] and "eval" not in log[0]
    assert set(log[1]["eval"]) == {"forget/mcq_acc", "forget/mcq_prob"}


def test_a_level_never_reached_runs_every_step_and_says_so(tmp_path, tiny_model_dir):
    result = _run(tmp_path, tiny_model_dir, "--set", "train.eval_every=3", "--set", "train.stop_at=forget/mcq_acc < 0")
    assert result.returncode == 0, result.stderr
    assert "never met train.stop_at" in result.stdout
    train = json.loads((tmp_path / "runs/r/metrics.json").read_text())["train"]
    assert train["steps"] == 6 and train["stopped_at"] is None and train["reached"] is False
    assert [r["step"] for r in _log(tmp_path / "runs/r") if "eval" in r] == [3, 6]


def test_eval_delay_skips_the_early_measurements_without_changing_the_training(tmp_path, tiny_model_dir):
    # A level every measurement meets: without the delay the run would stop at step 1.
    result = _run(tmp_path, tiny_model_dir, "--set", "train.eval_every=1", "--set", "train.eval_delay=4",
                  "--set", "train.stop_at=forget/mcq_acc <= 1")
    assert result.returncode == 0, result.stderr
    train = json.loads((tmp_path / "runs/r/metrics.json").read_text())["train"]
    assert train["steps"] == 4 and train["stopped_at"] == 4
    assert [r["step"] for r in _log(tmp_path / "runs/r") if "eval" in r] == [4]
    # Measuring is outside the training: the same six steps with and without measurements give the same losses.
    for name, sets in (("measured", ["train.eval_every=2"]), ("delayed", ["train.eval_every=2", "train.eval_delay=5"])):
        assert _run(tmp_path, tiny_model_dir, *[a for s in sets for a in ("--set", s)], name=name).returncode == 0
    measured, delayed = _log(tmp_path / "runs/measured"), _log(tmp_path / "runs/delayed")
    assert [r["step"] for r in measured if "eval" in r] == [2, 4, 6]
    assert [r["step"] for r in delayed if "eval" in r] == [6]
    assert [r["loss"] for r in measured] == [r["loss"] for r in delayed]


@pytest.mark.parametrize(("sets", "message"), [
    (["train.stop_at=forget/mcq_acc <= 0.3"], "set train.eval_every > 0"),
    (["train.eval_every=2", "train.stop_at=__import__('os') <= 1"], "must read 'METRIC OP NUMBER'"),
    (["train.eval_every=2", "train.stop_at=forget/mcq_acc == 0.3"], "must read 'METRIC OP NUMBER'"),
])
def test_bad_stop_rules_fail_before_any_model_loads(tmp_path, tiny_model_dir, sets, message):
    result = _run(tmp_path, tiny_model_dir, *[x for s in sets for x in ("--set", s)])
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "r").exists()


def test_a_metric_the_probe_does_not_measure_is_named(tmp_path, tiny_model_dir):
    result = _run(tmp_path, tiny_model_dir, "--set", "train.eval_every=2", "--set", "train.stop_at=forget/rougeL <= 1")
    assert result.returncode == 2 and "'forget/rougeL' is not measured during training" in result.stderr
    assert not (tmp_path / "runs" / "r").exists()


def test_stop_rule_parsing_and_checks():
    rule = StopRule.parse(" retain/mcq_acc>=0.85 ")
    assert (rule.metric, rule.op, rule.level) == ("retain/mcq_acc", ">=", 0.85)
    assert rule.reached({"retain/mcq_acc": 0.9}) and not rule.reached({"retain/mcq_acc": 0.8})
    assert not rule.reached({"retain/mcq_acc": float("nan")})
    with pytest.raises(UserError):
        StopRule.parse("forget/mcq_acc <= inf")


def test_attacks_with_other_settings_or_seeds_never_overwrite_each_other(tmp_path, tiny_model_dir):
    assert _run(tmp_path, tiny_model_dir).returncode == 0
    for extra in ([], ["--seed", "1"], ["--lr", "1e-4"], ["--seed", "0"]):
        result = cli("attack", "--run", "runs/r", "--relearn", "--checkpoints", "0,2", "-q", *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    folders = sorted(p.name for p in (tmp_path / "runs/r/attacks").iterdir())
    # The run's own seed (0) is the default: --seed 0 is the same attack as none, and replaces it.
    assert folders == ["relearn", "relearn-lr0.0001", "relearn-seed1"], folders
    seeds = {f: json.loads((tmp_path / "runs/r/attacks" / f / "metrics.json").read_text())["settings"]["seed"]
             for f in folders}
    assert seeds == {"relearn": 0, "relearn-lr0.0001": 0, "relearn-seed1": 1}
    assert json.loads((tmp_path / "runs/r/attacks/relearn/items.json").read_text())["attacked"]


def test_report_shows_lr_lora_rank_and_the_recovery_interval(tmp_path, tiny_model_dir):
    assert _run(tmp_path, tiny_model_dir, "--lr", "3e-5", "--lora-rank", "2").returncode == 0
    assert cli("attack", "--run", "runs/r", "--quantize", "rtn4", "-q", cwd=tmp_path).returncode == 0
    report = cli("report", "runs", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    header, _, *rows = [line for line in report.stdout.splitlines() if line.startswith("| run | benchmark")
                        or line.startswith("|---") or line.startswith("| r |")][:3]
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")],
                     [c.strip() for c in rows[0].strip("|").split("|")], strict=True))
    assert cells["lr"] == "3e-05" and cells["LoRA rank"] == "2"
    path = tmp_path / "runs/r/attacks/rtn-4bit-channel/metrics.json"
    record = json.loads(path.read_text())
    assert {r["metric"] for r in record["recoveries"]} >= {"forget/mcq_acc", "forget/mcq_prob"}
    # The tiny target knows little, so its headline ratio may be undefined: give it a hand-made one and its interval.
    record["recovery"].update(unlearned=0.2, attacked=0.4, target=1.0, ratio=0.25, low=0.125, high=0.375, n=40)
    path.write_text(json.dumps(record))
    assert cli("report", "runs", cwd=tmp_path).returncode == 0
    assert "| [0.125, 0.375] n=40 |" in (tmp_path / "runs/report.md").read_text()


def test_eval_rouge_false_skips_generation_and_says_nothing_about_rouge(tmp_path, tiny_model_dir):
    result = _run(tmp_path, tiny_model_dir, "--set", "eval.rouge=false")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "runs/r/metrics.json").read_text())["metrics"]
    assert "forget/mcq_acc" in metrics and "forget/mcq_prob" in metrics
    assert not [k for k in metrics if "rougeL" in k]
