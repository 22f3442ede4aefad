"""`unlearn run/eval/report --benchmark wmdp|muse|openqa` end to end on the tiny model, offline, on files the
project writes itself (`unlearn example-data`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SMALL, cli
from unlearn.benchmarks.example_data import write_example_data

FAST = ["--steps", "2", "--batch-size", "2", "-q", "--set", "eval.max_new_tokens=4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench") / "example-data"
    write_example_data(folder, SMALL)
    return folder


def _wmdp_args(data: Path) -> list[str]:
    w = data / "wmdp"
    return ["--benchmark", "wmdp", "--data", str(w / "questions.jsonl"), "--forget-corpus",
            str(w / "forget_corpus.jsonl"), "--retain-corpus", str(w / "retain_corpus.jsonl"),
            "--set", f"benchmark.utility={w / 'mmlu.jsonl'}"]


def test_example_data_command(tmp_path: Path) -> None:
    result = cli("example-data", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "wmdp" / "questions.jsonl").is_file()
    assert (tmp_path / "out" / "muse" / "verbmem" / "forget.json").is_file()
    again = cli("example-data", "out", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_wmdp_run_eval_and_report(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    result = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir),
                 *_wmdp_args(data), "--engine", "native", "--openqa", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "npo-adamw"
    record = json.loads((run / "metrics.json").read_text())
    assert record["benchmark"] == "wmdp" and record["headline"] == "wmdp/acc"
    for key in ("wmdp/acc", "wmdp/openqa_acc", "mmlu/acc", "wmdp/acc/pet"):
        assert key in record["metrics"] and key in record["target"]
    assert "| WMDP ↓ |" in result.stdout and "MMLU ↑" in result.stdout  # the run's own table
    saved = (run / "config.yaml").read_text()
    assert "people" not in saved  # the embedded benchmark's settings do not leak into a wmdp run

    # re-evaluated on its own benchmark, through lm-eval this time: the in-loop scorer gave the same numbers
    again = cli("eval", "--run", str(run), "--engine", "lm-eval", "-q", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    reevaluated = json.loads((run / "metrics.json").read_text())["metrics"]
    assert reevaluated["wmdp/acc"] == record["metrics"]["wmdp/acc"]
    assert reevaluated["mmlu/acc"] == record["metrics"]["mmlu/acc"]

    attacked = cli("attack", "--run", str(run), "--quantize", "8bit", "-q", cwd=tmp_path)
    assert attacked.returncode == 0, attacked.stderr
    quantized = json.loads((run / "attacks" / "bnb-8bit" / "metrics.json").read_text())
    assert "wmdp/acc" in quantized["metrics"] and quantized["recovery"]["measured_on"] == "wmdp/acc"
    # Relearning runs on WMDP too: fine-tune on part of the forget corpus, measure WMDP accuracy at each checkpoint.
    relearn = cli("attack", "--run", str(run), "--relearn", "--steps", "2", "--checkpoints", "0,2", "-q", cwd=tmp_path)
    assert relearn.returncode == 0, relearn.stderr
    relearned = json.loads((run / "attacks" / "relearn-steps2" / "metrics.json").read_text())
    assert [p["step"] for p in relearned["curve"]] == [0, 2] and relearned["recovery"]["metric"] == "wmdp/acc"
    assert relearned["curve"][0]["wmdp/acc"] == pytest.approx(record["metrics"]["wmdp/acc"])  # native = lm-eval
    assert "wmdp/acc" in relearned["metrics"] and len(relearned["details"]["used_indices"]) >= 1

    report = cli("report", "runs", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    header = report.stdout.splitlines()[0]
    assert "WMDP ↓" in header and "WMDP open-QA ↓" in header and "forget ↓" not in header
    assert "after bnb-8bit" in header and "after relearn-steps2" in header
    assert "## Per concept" in (tmp_path / "runs" / "report.md").read_text()


def test_wmdp_run_needs_a_forget_corpus(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    result = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir), "--benchmark",
                 "wmdp", "--data", str(data / "wmdp" / "questions.jsonl"), *FAST, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: benchmark 'wmdp' gives no forget text to unlearn: pass --forget-corpus FILE of {text} records"]
    assert not (tmp_path / "runs" / "npo-adamw").exists()


def test_muse_sequential_run(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    result = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir), "--benchmark",
                 "muse", "--data", str(data / "muse"), "--set", "benchmark.sequential=true",
                 "--set", "benchmark.verbmem_tokens=4", "--set", "benchmark.knowmem_tokens=4",
                 "--set", "benchmark.auc_retrain=0.5", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "npo-adamw"
    record = json.loads((run / "metrics.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["forget_1", "forget_2", "forget_3", "forget_4"]
    assert record["train"]["steps"] == 4 * 2
    assert record["stages"][-1]["metrics"] == record["metrics"]
    assert sorted(p.name for p in run.glob("log-*.jsonl")) == [f"log-{i}-forget_{i}.jsonl" for i in range(1, 5)]
    for key in ("muse/verbmem_forget", "muse/knowmem_forget", "muse/knowmem_retain", "muse/privleak"):
        assert key in record["metrics"]
    assert record["metrics"]["muse/privleak"] == pytest.approx((record["metrics"]["muse/privleak_auc"] - 0.5) / 0.5
                                                               * 100)
    assert result.stdout.count("| after forget_") == 3  # a table row after each earlier request
    assert "VerbMem ×100 ↓" in result.stdout
    # Relearning on MUSE: fine-tune on part of the forget corpus, repeat VerbMem / KnowMem (not the Min-K% pass).
    relearn = cli("attack", "--run", str(run), "--relearn", "--steps", "1", "--checkpoints", "0,1", "--batch-size",
                  "2", "-q", cwd=tmp_path)
    assert relearn.returncode == 0, relearn.stderr
    relearned = json.loads((run / "attacks" / "relearn-steps1-batchsize2" / "metrics.json").read_text())
    assert relearned["recovery"]["metric"] == "muse/verbmem_forget" and relearned["recovery"]["target"] is not None
    assert set(relearned["curve"][0]) == {"step", "muse/verbmem_forget", "muse/knowmem_forget", "muse/knowmem_retain"}
    assert relearned["curve"][0]["muse/knowmem_retain"] == pytest.approx(record["metrics"]["muse/knowmem_retain"])
    assert "muse/privleak" in relearned["metrics"]


def test_muse_eval_of_any_model(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    result = cli("eval", "--benchmark", "muse", "--data", str(data / "muse"), "--model", str(tiny_model_dir),
                 "--set", "benchmark.verbmem_tokens=4", "--set", "benchmark.knowmem_tokens=4", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "muse/privleak_auc" in result.stdout
    assert "note: muse/privleak not computed" in result.stdout  # said, not faked


@pytest.mark.parametrize(("args", "message"), [
    (["--benchmark", "muse", "--data", "nowhere"], "nowhere: not a directory"),
    (["--benchmark", "wmdp", "--data", "missing.jsonl"], "missing.jsonl: file not found"),
    (["--benchmark", "bogus"], "unknown benchmark 'bogus'"),
    (["--benchmark", "wmdp", "--set", "benchmark.data=x.csv"], "x.csv: file not found"),
    (["--engine", "fast"], "unknown eval.engine 'fast'; choose from: lm-eval, native"),
])
def test_benchmark_errors_are_one_line(tmp_path: Path, tiny_model_dir: Path, args: list[str], message: str) -> None:
    result = cli("eval", "--model", str(tiny_model_dir), *args, "-q", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_muse_malformed_file_names_file_and_field(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    import shutil

    broken = tmp_path / "muse"
    shutil.copytree(data / "muse", broken)
    rows = json.loads((broken / "verbmem" / "forget.json").read_text())
    del rows[0]["gt"]
    (broken / "verbmem" / "forget.json").write_text(json.dumps(rows))
    result = cli("eval", "--benchmark", "muse", "--data", str(broken), "--model", str(tiny_model_dir), "-q",
                 cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {broken / 'verbmem' / 'forget.json'}: record 1: missing field 'gt'"
