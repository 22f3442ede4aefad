"""One --seed sets every random stream of a run (and of the attacks on it); a wrecked model is flagged collapsed."""

from __future__ import annotations

import json

import yaml

from tests.conftest import TINY_BENCH, cli
from unlearn.evaluation.collapse import collapse_reasons
from unlearn.recipes.pipeline import seeded
from unlearn.storage.metrics import Metric
from unlearn.training.config import load_run_config


def test_seed_reaches_the_optimizer_and_method_streams_unless_given() -> None:
    cfg = seeded(load_run_config("rmu", "hybrid", flags={"train.seed": 7}))
    assert cfg.method["seed"] == 7 and cfg.optimizer["zo"]["seed"] == 7 and "seed" not in cfg.optimizer["fo"]
    explicit = seeded(load_run_config("npo", "zo", flags={"train.seed": 7}, overrides=["optimizer.seed=2"]))
    assert explicit.optimizer["seed"] == 2  # a stream's own seed wins
    assert seeded(load_run_config("npo", "zo-rank", flags={"train.seed": 3})).optimizer["seed"] == 3


def test_one_seed_changes_every_stream(tmp_path, tiny_model_dir) -> None:
    """Data order, ZO directions, LoRA init and the relearning split all follow --seed, and config.yaml says so."""
    runs = {}
    for seed in (0, 5):
        name = f"s{seed}"
        result = cli("run", "--method", "npo", "--optimizer", "zo", "--model", str(tiny_model_dir), "--lora-rank", "2",
                     "--steps", "2", "--batch-size", "2", "--seed", str(seed), "--name", name, "-q", *TINY_BENCH,
                     cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        attack = cli("attack", "--run", f"runs/{name}", "--relearn", "--steps", "1", "-q", cwd=tmp_path)
        assert attack.returncode == 0, attack.stderr
        config = yaml.safe_load((tmp_path / "runs" / name / "config.yaml").read_text())
        record = json.loads((tmp_path / "runs" / name / "attacks" / "relearn-steps1" / "metrics.json").read_text())
        log = [json.loads(line) for line in (tmp_path / "runs" / name / "log.jsonl").read_text().splitlines()]
        assert config["train"]["seed"] == config["optimizer"]["seed"] == record["settings"]["seed"] == seed
        runs[seed] = (log, record["details"]["used_forget_indices"])
    (log0, split0), (log5, split5) = runs[0], runs[5]
    assert split0 != split5  # the attack's split
    assert log0[0]["parts"] != log5[0]["parts"]  # another batch, another LoRA init, other directions


def test_collapse_reasons() -> None:
    declared = [Metric("retain/acc", "retain", "higher", "utility", chance=0.25),
                Metric("retain/perplexity", "perplexity", "lower", "utility", "perplexity"),
                Metric("forget/acc", "forget", "lower", "forget", chance=0.25)]
    target = {"retain/acc": 1.0, "retain/perplexity": 60.0, "forget/acc": 1.0}
    assert collapse_reasons({"retain/acc": 0.9, "retain/perplexity": 80.0, "forget/acc": 0.1}, target, declared,
                            10.0) == []  # forget below chance is the point, not a collapse
    reasons = collapse_reasons({"retain/acc": 0.17, "retain/perplexity": 6.7e9}, target, declared, 10.0)
    assert len(reasons) == 2 and "below chance" in reasons[0] and "10x" in reasons[1]


def test_a_wrecked_model_is_flagged_collapsed_everywhere(tmp_path, tiny_model_dir) -> None:
    # Gradient ascent at a huge rate: the tiny model's perplexity explodes.
    result = cli("run", "--method", "gradascent", "--optimizer", "sgd", "--lr", "30", "--model", str(tiny_model_dir),
                 "--steps", "3", "--batch-size", "2", "--name", "wrecked", "-q", *TINY_BENCH, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: this run collapsed" in result.stdout
    record = json.loads((tmp_path / "runs" / "wrecked" / "metrics.json").read_text())
    assert record["collapsed"] is True and any("perplexity" in r for r in record["collapse"])
    attack = cli("attack", "--run", "runs/wrecked", "--quantize", "rtn8", "-q", cwd=tmp_path)
    assert attack.returncode == 0, attack.stderr
    assert "collapsed" in attack.stdout  # the warning, before the attack runs
    (folder,) = (tmp_path / "runs" / "wrecked" / "attacks").iterdir()
    attacked = json.loads((folder / "metrics.json").read_text())
    assert "collapsed" in attacked["recovery"]["note"]
    report = cli("report", "runs", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "collapsed" in report.stdout and "run collapsed: meaningless" in report.stdout
