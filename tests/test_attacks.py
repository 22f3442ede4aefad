"""Relearning and quantization attacks on a tiny run, through the CLI, plus the recovery maths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_cli import TINY_BENCH, cli
from unlearn.attacks.relearn import split_forget
from unlearn.errors import UserError
from unlearn.recipes.attack import recovery_ratio


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished tiny `unlearn run`, copied fresh into each test's folder by `workdir`."""
    root = tmp_path_factory.mktemp("attack-runs")
    result = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir), "--steps", "2",
                 "--batch-size", "2", "--name", "tiny", "-q", *TINY_BENCH, cwd=root)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture()
def workdir(tmp_path, tiny_run) -> Path:
    shutil.copytree(tiny_run / "runs", tmp_path / "runs")
    shutil.copytree(tiny_run / "cache", tmp_path / "cache")
    return tmp_path


def test_recovery_ratio():
    assert recovery_ratio(0.5, 0.2, 1.0) == (pytest.approx(0.375), "ok")
    assert recovery_ratio(0.2, 0.2, 1.0)[0] == 0.0
    assert recovery_ratio(1.0, 0.2, 1.0)[0] == pytest.approx(1.0)
    ratio, note = recovery_ratio(0.9, 0.8, 0.8)
    assert ratio is None and "undefined" in note


def test_split_forget_is_seeded_and_disjoint():
    used, unused = split_forget(10, None, seed=3)
    assert len(used) == 5 and sorted(used + unused) == list(range(10))
    assert split_forget(10, None, seed=3) == (used, unused)
    assert split_forget(10, None, seed=4) != (used, unused)
    with pytest.raises(UserError, match="between 1 and 9"):
        split_forget(10, 10, seed=0)


def test_relearn_attack_writes_curve_and_report(workdir):
    result = cli("attack", "--run", "runs/tiny", "--relearn", "--steps", "3", "--checkpoints", "0,2,5",
                 "--batch-size", "2", "-q", cwd=workdir)
    assert result.returncode == 0, result.stderr
    record = json.loads((workdir / "runs/tiny/attacks/relearn/metrics.json").read_text())
    assert [p["step"] for p in record["curve"]] == [0, 2, 3]
    assert not set(record["used_forget_indices"]) & set(record["unseen_forget_indices"])
    assert "forget/mcq_acc" in record["metrics"] and "recovery" in record
    curve = record["recovery"]["curve"]
    assert curve[0]["ratio"] in (0.0, None)  # at step 0 nothing can have come back yet
    report = cli("report", "runs", cwd=workdir)
    assert report.returncode == 0, report.stderr
    assert "forget relearned (unseen)" in report.stdout
    assert (workdir / "runs/relearn_curves.png").stat().st_size > 1000
    assert "relearn_curves.png" in (workdir / "runs/report.md").read_text()


def test_relearn_lora_out_of_domain(workdir):
    result = cli("attack", "--run", "runs/tiny", "--relearn", "--lora", "--lora-rank", "2", "--out-of-domain",
                 "--steps", "2", "--batch-size", "2", "-q", cwd=workdir)
    assert result.returncode == 0, result.stderr
    record = json.loads((workdir / "runs/tiny/attacks/relearn-ood-lora/metrics.json").read_text())
    assert record["settings"]["domain"] == "retain" and record["settings"]["lora"]


@pytest.mark.parametrize("quantize", ["rtn4", "8bit"])
def test_quantize_attack(workdir, quantize):
    result = cli("attack", "--run", "runs/tiny", "--quantize", quantize, "-q", cwd=workdir)
    assert result.returncode == 0, result.stderr
    name = {"rtn4": "rtn-4bit-channel", "8bit": "bnb-8bit"}[quantize]
    record = json.loads((workdir / f"runs/tiny/attacks/{name}/metrics.json").read_text())
    assert 0.0 <= record["metrics"]["forget/mcq_acc"] <= 1.0 and "recovery" in record


@pytest.mark.parametrize("args, message", [
    (["--run", "runs/missing", "--quantize", "4bit"], "does not exist"),
    (["--run", "runs/tiny", "--quantize", "3bit"], "unsupported --quantize '3bit'"),
    (["--run", "runs/tiny"], "choose one attack"),
    (["--run", "runs/tiny", "--relearn", "--samples", "1000"], "--samples must be between"),
])
def test_attack_errors(workdir, args, message):
    result = cli("attack", *args, "-q", cwd=workdir)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_attack_run_without_model(workdir):
    shutil.rmtree(workdir / "runs/tiny/model")
    shutil.rmtree(workdir / "runs/tiny/attacks", ignore_errors=True)
    before = sorted(p.name for p in (workdir / "runs/tiny").iterdir())
    result = cli("attack", "--run", "runs/tiny", "--quantize", "8bit", cwd=workdir)
    assert result.returncode == 2 and "has no model/" in result.stderr
    assert sorted(p.name for p in (workdir / "runs/tiny").iterdir()) == before  # nothing half-written
