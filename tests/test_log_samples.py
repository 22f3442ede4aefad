"""`--log-samples`: one JSON line per scored item, for every benchmark and both MCQ engines, that agrees with
the aggregate metrics printed beside it."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SMALL, TINY_BENCH, cli
from unlearn.benchmarks.example_data import write_example_data

MUSE_FAST = ["--set", "benchmark.verbmem_tokens=4", "--set", "benchmark.knowmem_tokens=4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("samples") / "example-data"
    write_example_data(folder, SMALL)
    return folder


def _read(path: Path) -> dict[str, list[dict[str, Any]]]:
    by_metric: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_metric[row["metric"]].append(row)
    return dict(by_metric)


def _printed(stdout: str, key: str) -> float:
    line = next(x for x in stdout.splitlines() if x.split() and x.split()[0] == key)
    return float(line.split()[1])


def _check_mcq(rows: list[dict[str, Any]], accuracy: float) -> None:
    assert [r["index"] for r in rows] == list(range(len(rows)))
    for r in rows:
        assert r["prompt"].endswith("Answer:") and len(r["scores"]) == len(r["choices"])
        assert r["pred"] == max(range(len(r["scores"])), key=r["scores"].__getitem__)
        assert r["correct"] == (r["pred"] == r["gold"])
    assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(accuracy, abs=1e-4)


@pytest.mark.parametrize("engine", ["native", "lm-eval"])
def test_wmdp_samples_both_engines(tmp_path: Path, tiny_model_dir: Path, data: Path, engine: str) -> None:
    out = tmp_path / "samples.jsonl"
    result = cli("eval", "--model", str(tiny_model_dir), "--benchmark", "wmdp", "--data",
                 str(data / "wmdp" / "questions.jsonl"), "--set", f"benchmark.utility={data / 'wmdp' / 'mmlu.jsonl'}",
                 "--engine", engine, "--log-samples", "--samples-path", str(out), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    samples = _read(out)
    assert set(samples) == {"wmdp/acc", "mmlu/acc"}
    n_questions = len((data / "wmdp" / "questions.jsonl").read_text().splitlines())
    assert len(samples["wmdp/acc"]) == n_questions
    for key in ("wmdp/acc", "mmlu/acc"):
        _check_mcq(samples[key], _printed(result.stdout, key))
    assert all(r["concept"] for r in samples["wmdp/acc"])  # the file's concept tags come along
    assert f"wrote {out} ({sum(map(len, samples.values()))} samples)" in result.stdout


def test_embedded_samples_in_the_run_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir), "--steps", "1",
              "--batch-size", "2", *TINY_BENCH, "--log-samples", "-q", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    folder = tmp_path / "runs" / "npo-adamw"
    metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
    samples = _read(folder / "samples.jsonl")
    assert set(samples) == {"forget/mcq", "retain/mcq", "holdout/mcq", "forget/rougeL", "retain/rougeL",
                            "retain/perplexity"}
    for split in ("forget", "retain", "holdout"):
        _check_mcq(samples[f"{split}/mcq"], metrics[f"{split}/mcq_acc"])
    for split in ("forget", "retain"):
        rows = samples[f"{split}/rougeL"]
        assert all({"prompt", "gold", "generation", "score"} <= set(r) for r in rows)
        assert sum(r["score"] for r in rows) / len(rows) == pytest.approx(metrics[f"{split}/rougeL"])
    assert all(r["tokens"] > 0 and r["nll"] > 0 for r in samples["retain/perplexity"])
    # `eval --run --log-samples` rewrites them next to metrics.json.
    (folder / "samples.jsonl").unlink()
    again = cli("eval", "--run", str(folder), "--log-samples", "-q", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert set(_read(folder / "samples.jsonl")) == set(samples)


def test_muse_samples_and_eval_without_raw_text(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    folder = tmp_path / "muse"
    shutil.copytree(data / "muse", folder)
    shutil.rmtree(folder / "raw")  # evaluation reads no raw text
    out = tmp_path / "muse.jsonl"
    result = cli("eval", "--benchmark", "muse", "--data", str(folder), "--model", str(tiny_model_dir), *MUSE_FAST,
                 "--log-samples", "--samples-path", str(out), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    samples = _read(out)
    assert set(samples) == {"muse/verbmem_forget", "muse/knowmem_forget", "muse/knowmem_retain", "muse/privleak"}
    for key in ("muse/verbmem_forget", "muse/knowmem_forget", "muse/knowmem_retain"):
        rows = samples[key]
        assert sum(r["score"] for r in rows) / len(rows) == pytest.approx(_printed(result.stdout, key), abs=1e-3)
    assert any(line.startswith("muse/knowmem_forget") and line.endswith("ROUGE-L F1 ×100")
               for line in result.stdout.splitlines())  # every printed value carries its unit
    privleak = samples["muse/privleak"]
    assert {r["split"] for r in privleak} == {"forget", "holdout"}
    assert all(not r["truncated"] and r["scored_tokens"] == r["tokens"] for r in privleak)
    # Training does need the raw text, and says which.
    run = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir), "--benchmark", "muse",
              "--data", str(folder), "-q", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"error: benchmark 'muse' gives no forget text to unlearn: MUSE's unlearning "
                                  f"text raw/forget and raw/retain1 was not found in {folder}")


def test_openqa_samples(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    out = tmp_path / "openqa.jsonl"
    result = cli("eval", "--model", str(tiny_model_dir), "--benchmark", "openqa", "--data",
                 str(data / "wmdp" / "questions.jsonl"), "--engine", "native", "--set", "eval.max_new_tokens=4",
                 "--log-samples", "--samples-path", str(out), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    samples = _read(out)
    assert set(samples) == {"openqa/acc", "openqa/openqa"}
    rows = samples["openqa/openqa"]
    assert all({"prompt", "gold", "generation", "correct", "judge"} <= set(r) for r in rows)
    assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(_printed(result.stdout, "openqa/openqa_acc"),
                                                                         abs=1e-4)


def test_samples_path_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    for args, message in [
        (["--log-samples"], "--log-samples with --model needs --samples-path FILE.jsonl"),
        (["--samples-path", "x.jsonl"], "--samples-path goes with --log-samples"),
        (["--log-samples", "--samples-path", "nowhere/x.jsonl"], "folder nowhere does not exist"),
    ]:
        result = cli("eval", "--model", str(tiny_model_dir), *args, "-q", cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[0], result.stderr
