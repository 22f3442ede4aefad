"""Membership inference: every score against a hand computation on the tiny model, the AUC and its interval, a
model trained on the forget items detected, and `unlearn attack --attack mia` end to end."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_BENCH, assert_user_error, cli
from unlearn.evaluation.membership import (
    TokenStats,
    encoded,
    grad_norms,
    loss_score,
    min_k_plus_plus_score,
    min_k_score,
    reference_score,
    token_stats,
    zlib_score,
)
from unlearn.evaluation.stats import roc_auc, two_sample_bootstrap
from unlearn.tasks.data import Example

ITEMS = [Example("Question: Where was Ada born?\nAnswer:", " Zorbu"), Example("", "a whole passage of text")]


def test_scores_by_hand() -> None:
    lp = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0], dtype=torch.float64)
    mu = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    var = torch.tensor([1.0, 4.0, 0.25, 1.0, 0.0], dtype=torch.float64)
    stats = TokenStats(lp, mu, var, "Zorbu")
    assert loss_score(stats) == pytest.approx(3.0)
    assert zlib_score(stats) == pytest.approx(3.0 / len(zlib.compress(b"Zorbu")))
    assert min_k_score(stats, 0.4) == pytest.approx(4.5)  # the lowest 2 of 5: -5, -4
    assert min_k_score(stats, 0.1) == pytest.approx(5.0)  # never fewer than one token
    # z = (lp - mu) / sigma = 0, -0.5, -4, -3, -4/sqrt(1e-6) (the variance floor): the lowest two are -4000, -4
    assert min_k_plus_plus_score(stats, 0.4) == pytest.approx((4 / math.sqrt(1e-6) + 4) / 2)
    other = TokenStats(lp + 1, mu, var, "Zorbu")
    assert reference_score(stats, other) == pytest.approx(1.0)


def test_token_stats_against_the_full_distribution(tiny) -> None:
    model, tokenizer = tiny
    items = encoded(tokenizer, ITEMS, None)
    assert items[0].input_ids[-1] == tokenizer.eos_token_id and items[1].input_ids[-1] != tokenizer.eos_token_id
    stats = token_stats(model, tokenizer, items, batch_size=2)
    for item, got in zip(items, stats, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([item.input_ids])).logits[0].double(), -1)
        start = max(item.n_prompt, 1)
        rows = logp[start - 1:len(item.input_ids) - 1]
        targets = torch.tensor(item.input_ids[start:])
        assert torch.allclose(got.logprobs, rows.gather(1, targets[:, None])[:, 0], atol=1e-5)
        mu = (rows.exp() * rows).sum(-1)
        assert torch.allclose(got.mu, mu, atol=1e-5)
        assert torch.allclose(got.variance, (rows.exp() * rows.square()).sum(-1) - mu.square(), atol=1e-4)
    assert stats[0].text == " Zorbu"


def test_grad_norm_by_hand(tiny) -> None:
    model, tokenizer = tiny
    [item] = encoded(tokenizer, ITEMS[:1], None)
    [score] = grad_norms(model, tokenizer, [item], p=2.0)
    model.zero_grad()
    logits = model(torch.tensor([item.input_ids])).logits[0, :-1]
    targets = torch.tensor(item.input_ids[1:])
    nll = torch.nn.functional.cross_entropy(logits[item.n_prompt - 1:], targets[item.n_prompt - 1:])
    grads = torch.autograd.grad(nll, list(model.parameters()))
    assert score == pytest.approx(float(torch.stack([g.norm() for g in grads]).mean()), rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was found


def test_roc_auc_matches_sklearn_and_its_interval() -> None:
    from sklearn.metrics import roc_auc_score

    members, nonmembers = [0.1, 0.4, 0.35, 0.8, 0.5], [0.5, 0.9, 0.7, 0.2]
    expected = roc_auc_score([0] * 5 + [1] * 4, members + nonmembers)
    assert roc_auc(members, nonmembers) == pytest.approx(expected)
    interval = two_sample_bootstrap(members, nonmembers, lambda a, b: roc_auc(a[:, 0], b[:, 0]), resamples=300)
    assert interval.value == pytest.approx(expected) and interval.low < expected < interval.high
    assert interval == two_sample_bootstrap(members, nonmembers, lambda a, b: roc_auc(a[:, 0], b[:, 0]),
                                            resamples=300)  # seeded


def test_a_model_trained_on_the_forget_items_is_detected(tiny) -> None:
    from unlearn.benchmarks.embedded import task_from
    from unlearn.benchmarks.synthetic import SyntheticSettings, generate

    model, tokenizer = tiny
    task = task_from(generate(SyntheticSettings(people=(4, 0, 4), cities=(2, 2, 2), organizations=(2, 2, 2))))
    membership = task.membership()
    members, nonmembers = (encoded(tokenizer, x, None) for x in (membership.members, membership.nonmembers))

    def auc() -> float:
        m, n = (token_stats(model, tokenizer, x, 16) for x in (members, nonmembers))
        return roc_auc([loss_score(s) for s in m], [loss_score(s) for s in n])

    before = auc()
    from unlearn.tasks.data import collate

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = collate(members, tokenizer.pad_token_id)
    model.train()
    for _ in range(100):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = auc()
    assert abs(before - 0.5) < 0.3 and after > 0.9, (before, after)


def test_attack_prints_six_aucs_with_intervals(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir), *TINY_BENCH,
              "--steps", "2", "--batch-size", "2", "-q", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    folder = tmp_path / "runs" / "npo-adamw"
    result = cli("attack", "--run", str(folder), "--attack", "mia", "--set",
                 f"attack.reference_model={tiny_model_dir}", "--set", "attack.resamples=200", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("min_k", "min_k_plus_plus", "loss", "zlib", "gradnorm", "reference"):
        line = next(x for x in result.stdout.splitlines() if x.startswith(f"mia/{name}_auc "))
        assert "[" in line and "]" in line, line  # the AUC with its interval
    record = json.loads((folder / "attacks" / "mia" / "metrics.json").read_text())
    assert len(record["recoveries"]) == 6 and record["recovery"]["metric"] == "mia/min_k_auc"
    assert record["recovery"]["target"] == pytest.approx(record["details"]["target"]["mia/min_k_auc"])
    assert record["details"]["target"]["mia/min_k_auc_low"] <= record["recovery"]["target"]
    assert record["recovery"]["attacked"] == pytest.approx(record["metrics"]["mia/min_k_auc"])
    report = cli("report", "runs", cwd=tmp_path)
    assert report.returncode == 0 and "after mia" in report.stdout, report.stderr
    # without a reference model the Reference score is not computed, and says so
    again = cli("attack", "--run", str(folder), "--attack", "mia", "--set", "attack.scores=[loss,reference]",
                "--set", "attack.resamples=50", "-q", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    record = json.loads((folder / "attacks" / "mia" / "metrics.json").read_text())
    assert set(record["metrics"]) == {"mia/loss_auc", "mia/loss_auc_low", "mia/loss_auc_high"}
    assert "needs attack.reference_model" in record["details"]["notes"][0]


def test_a_benchmark_without_holdout_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tests.conftest import SMALL
    from unlearn.benchmarks.example_data import write_example_data

    write_example_data(tmp_path / "data", SMALL)
    result = cli("attack", "--model", str(tiny_model_dir), "--attack", "mia", "--benchmark", "wmdp", "--data",
                 str(tmp_path / "data" / "wmdp" / "questions.jsonl"), cwd=tmp_path)
    assert_user_error(result, "has no holdout set", tmp_path)
    result = cli("attack", "--model", str(tiny_model_dir), "--attack", "mia", "--set", "attack.scores=[nope]",
                 cwd=tmp_path)
    assert_user_error(result, "attack.scores must be distinct names", tmp_path)
