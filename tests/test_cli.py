"""The command line on a tiny model: a full run, the report, and every kind of bad input.

Bad input must give one line on stderr, exit code 2, no traceback and no run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tests.conftest import TINY_BENCH, assert_user_error, cli


def test_full_run_eval_and_report(tmp_path, tiny_model_dir):
    result = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir),
                 "--steps", "3", "--batch-size", "2", "-q", *TINY_BENCH, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "npo-adamw"
    assert sorted(p.name for p in run.iterdir()) == [".unlearn", "config.yaml", "items.json", "log.jsonl",
                                                      "metrics.json", "model"]
    assert "| npo-adamw | embedded | npo | adamw |" in result.stdout
    live = next(line for line in result.stdout.splitlines() if line.startswith("training log (live): "))
    assert "/.staging-npo-adamw-" in live and live.split()[3].endswith("/log.jsonl")  # where it can be watched
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["forwards"] == 1 for r in log)
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("forget", "retain", "holdout"):
        assert 0.0 <= metrics["metrics"][f"{split}/mcq_acc"] <= 1.0
    assert metrics["train"]["steps"] == 3 and "forget/mcq_acc" in metrics["target"]
    AutoModelForCausalLM.from_pretrained(run / "model")  # plain transformers can load it

    again = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir),
                "--steps", "1", "--batch-size", "2", "-q", *TINY_BENCH, cwd=tmp_path)
    assert again.returncode == 0 and (tmp_path / "runs" / "npo-adamw-2").is_dir()  # never clobbers

    evaluated = cli("eval", "--run", str(run), "-q", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "forget/mcq_acc" in evaluated.stdout

    report = cli("report", "runs", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    csv_lines = (tmp_path / "runs" / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 1 + 2  # header, target row, two runs
    page = (tmp_path / "runs" / "report.md").read_text()
    main_table, _, per_concept = page.partition("## Per concept")
    assert sum(line.startswith("|") for line in main_table.splitlines()) == 2 + 3  # header, rule, 3 rows
    assert "headline 4-bit" not in page  # no attack columns before any attack ran
    assert "WMDP" not in main_table and "VerbMem" not in main_table  # other benchmarks' columns stay out
    # the embedded questions are tagged by attribute: one row per run, one column per attribute
    assert sum(line.startswith("| npo-adamw") for line in per_concept.splitlines()) == 2
    assert "| forget/mcq_acc |" in per_concept and "profession" in per_concept


@pytest.mark.parametrize("args, message", [
    (["--method", "bogus", "--optimizer", "adamw"], "unknown method 'bogus'"),
    (["--method", "npo", "--optimizer", "bogus"], "unknown optimizer 'bogus'"),
    (["--method", "npo", "--optimizer", "adamw", "--model", "./no/such/model"], "does not exist"),
    (["--method", "npo", "--optimizer", "adamw", "--set", "benchmark.people=[0,2,4]",
      "--set", "benchmark.cities=[0,2,2]", "--set", "benchmark.organizations=[0,2,2]"], "forget split is empty"),
    (["--method", "npo", "--optimizer", "adamw", "--set", "method.betta=1"], "unknown key(s) in method 'npo': betta"),
    (["--method", "npo", "--optimizer", "adamw", "--set", "optimizer.momentum=0.9"],
     "optimizer 'adamw'"),
])
def test_bad_run_input(tmp_path, tiny_model_dir, args, message):
    model = [] if "--model" in args else ["--model", str(tiny_model_dir)]
    result = cli("run", "-q", *model, *TINY_BENCH, *args, cwd=tmp_path)  # later --set wins
    assert_user_error(result, message, tmp_path)


def test_malformed_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: {max_steps: [\n")
    result = cli("run", "--method", "npo", "--optimizer", "adamw", "--config", "bad.yaml", cwd=tmp_path)
    assert_user_error(result, "malformed YAML in bad.yaml", tmp_path)


def test_nan_loss_leaves_no_run_folder(tmp_path, tiny_model_dir):
    result = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir),
                 "--steps", "3", "--lr", "1e30", "-q", *TINY_BENCH, cwd=tmp_path)
    assert_user_error(result, "loss became nan at step", tmp_path)


def test_eval_and_report_errors(tmp_path):
    assert_user_error(cli("eval", "--run", "runs/missing", cwd=tmp_path), "does not exist", tmp_path)
    (tmp_path / "runs" / "empty-run").mkdir(parents=True)
    result = cli("eval", "--run", "runs/empty-run", cwd=tmp_path)
    assert result.returncode == 2 and "has no model/" in result.stderr
    result = cli("report", "runs", cwd=tmp_path)
    assert result.returncode == 2 and "no runs with metrics.json" in result.stderr


def test_lora_run_with_a_conflict_aware_optimizer(tmp_path, tiny_model_dir):
    """Unlearning through LoRA adapters with SIFT: per-part losses logged, a merged plain model saved."""
    result = cli("run", "--method", "npo", "--optimizer", "sift", "--lora-rank", "4", "--model",
                 str(tiny_model_dir), "--steps", "2", "--batch-size", "2", "-q", *TINY_BENCH, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "npo-sift"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["grade"] == "spectral" and set(r["parts"]) == {"forget", "retain"} for r in log)
    assert all(set(r["optimizer"]) <= {"sift_matrices", "mean_cosine"} and "sift_matrices" in r["optimizer"]
               for r in log)
    for r in log:  # the logged loss is the sum of its parts (one closure evaluation per step)
        assert r["loss"] == pytest.approx(r["parts"]["forget"] + r["parts"]["retain"], rel=1e-5)
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert not any("lora" in name for name, _ in model.named_parameters())  # adapters merged on save


def test_bad_lora_rank(tmp_path, tiny_model_dir):
    result = cli("run", "--method", "npo", "--optimizer", "zo", "--lora-rank", "-1", "--model",
                 str(tiny_model_dir), "-q", *TINY_BENCH, cwd=tmp_path)
    assert_user_error(result, "train.lora_rank must be an integer >= 0, got -1", tmp_path)


def test_optimizers_lists_every_grade(tmp_path):
    from unlearn.optim.protocol import OPTIMIZERS

    result = cli("optimizers", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}
    assert listed == {name: cls.grade for name, cls in OPTIMIZERS.items()}  # type: ignore[attr-defined]


def test_threads_per_process_share_the_cores():
    from unlearn.cli import threads_per_process
    from unlearn.core.errors import UserError

    assert threads_per_process({}, 8) == 8
    assert threads_per_process({"LOCAL_WORLD_SIZE": "4"}, 16) == 4  # torchrun / accelerate: 4 ranks per machine
    assert threads_per_process({"LOCAL_WORLD_SIZE": "4"}, 2) == 1
    assert threads_per_process({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, 16) == 3
    assert threads_per_process({"UNLEARN_THREADS": "5", "OMP_NUM_THREADS": "3"}, 16) == 5
    with pytest.raises(UserError, match="UNLEARN_THREADS must be a positive integer"):
        threads_per_process({"UNLEARN_THREADS": "many"}, 8)


def test_prepare_prints_what_the_benchmark_says_shows_the_target_knows(tmp_path, tiny_model_dir):
    """`unlearn prepare` asks the benchmark which metrics show preparation worked (embedded: MCQ accuracy on forget,
    retain and holdout), and a second call finds the cached target."""
    result = cli("prepare", "--model", str(tiny_model_dir), "-q", *TINY_BENCH, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["forget/mcq_acc", "retain/mcq_acc", "holdout/mcq_acc"]
    assert all(0.0 <= float(line.split()[1]) <= 1.0 for line in lines[:3])
    folder = Path(lines[3].removeprefix("target model: ").split("  (")[0])
    assert (folder / "config.json").is_file() and (folder.parent / "prepare.json").is_file()
    again = cli("prepare", "--model", str(tiny_model_dir), "-q", *TINY_BENCH, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == result.stdout
