"""TOFU: each metric pinned on a hand-computed case, the layout reader, and run / eval / attack end to end on the
tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL, assert_user_error, cli
from unlearn.benchmarks.synthetic import generate
from unlearn.benchmarks.tofu import TofuSettings, load_tofu, prompt_and_answer, write_tofu
from unlearn.benchmarks.tofu.metrics import (
    forget_quality,
    forget_truth_ratio,
    model_utility,
    normalized_prob,
    rouge_l_recall,
    truth_ratio,
    utility_truth_ratio,
)
from unlearn.benchmarks.tofu.settings import UTILITY_PARTS
from unlearn.core.errors import UserError
from unlearn.evaluation.measures import evaluate_items
from unlearn.training.config import EvalConfig

SHORT = ["--set", "benchmark.limit=3", "--set", "benchmark.generation_tokens=4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tofu(tmp_path_factory.mktemp("tofu") / "tofu", generate(SMALL))


def nll(p: float) -> float:
    return -math.log(p)


# ------------------------------------------------------------------------------------------ metrics by hand


def test_truth_ratio_of_known_probabilities() -> None:
    # correct 0.5 per token; perturbed 0.25 and 0.0625: their geometric mean is 0.125, so R = 0.125 / 0.5.
    r = truth_ratio(nll(0.5), [nll(0.25), nll(0.0625)])
    assert r == pytest.approx(0.25)
    assert forget_truth_ratio([r]) == pytest.approx(0.25)  # min(R, 1/R)
    assert utility_truth_ratio([r]) == pytest.approx(0.75)  # max(0, 1 - R)
    r2 = truth_ratio(nll(0.1), [nll(0.2)])  # a false answer twice as likely as the true one
    assert r2 == pytest.approx(2.0)
    assert forget_truth_ratio([r, r2]) == pytest.approx((0.25 + 0.5) / 2)
    assert utility_truth_ratio([r, r2]) == pytest.approx((0.75 + 0.0) / 2)


def test_normalized_prob_counts_each_perturbed_answer() -> None:
    assert normalized_prob(nll(0.5), [nll(0.25), nll(0.25)]) == pytest.approx(0.5)
    assert normalized_prob(nll(0.3), [nll(0.1)]) == pytest.approx(0.75)


def test_forget_quality_is_scipys_ks_p_value() -> None:
    from scipy.stats import ks_2samp

    ours, theirs = [1.0, 2.0, 3.0], [1.5, 2.5, 3.5, 4.0]
    p, d = forget_quality(ours, theirs)
    assert d == pytest.approx(0.5)  # the empirical CDFs differ most at 3: 3/3 vs 2/4
    assert p == pytest.approx(ks_2samp(ours, theirs).pvalue) and p == pytest.approx(23 / 35)  # exact test
    assert forget_quality([0.5, 0.7, 0.9], [0.5, 0.7, 0.9]) == (1.0, 0.0)  # the same sample: indistinguishable


def test_model_utility_is_a_harmonic_mean_and_zero_with_a_zero() -> None:
    from scipy.stats import hmean

    values = [0.5, 0.25, 1.0]
    assert model_utility(values) == pytest.approx(3 / 7) == pytest.approx(float(hmean(values)))
    assert model_utility([0.9] * 8 + [0.0]) == 0.0 == float(hmean([0.9] * 8 + [0.0]))
    with pytest.raises(ValueError):
        model_utility([0.5, math.nan])


def test_rouge_l_recall_with_stemming() -> None:
    assert rouge_l_recall("Jane Austen wrote it", "Austen") == pytest.approx(0.25)
    assert rouge_l_recall("she plays the cello", "She played the cello.") == pytest.approx(1.0)  # Porter stems


def test_prompt_moves_the_answer_tags_space_to_the_answer() -> None:
    prompt, answer = prompt_and_answer(TofuSettings(), "Who?", "Paris")
    assert (prompt, answer) == ("Question: Who?\nAnswer:", " Paris")  # the toolkit's QA prompt and target


def test_mean_nll_by_hand(tiny, data: Path) -> None:
    model, tokenizer = tiny
    task = load_tofu(TofuSettings(data=str(data)))
    [value] = task.mean_nlls(model, tokenizer, [("Who?", "Paris")], batch_size=4, max_batch_tokens=None)
    ids = tokenizer("Question: Who?\nAnswer:", add_special_tokens=True).input_ids
    answer = [*tokenizer(" Paris", add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids + answer])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    by_hand = -sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(answer)) / len(answer)
    assert value == pytest.approx(by_hand, rel=1e-5)


# ------------------------------------------------------------------------------------------ the task


def test_layout_and_example_data(data: Path) -> None:
    task = load_tofu(TofuSettings(data=str(data)))
    world = generate(SMALL)
    assert len(task.forget) == len(world.facts["forget"]) and len(task.retain) == len(world.facts["retain"])
    assert set(task.sets) == {"forget", "retain", "ra", "wf"} and len(task.holdout) == len(task.forget)
    first = task.sets["forget"][0]
    assert first.paraphrased.endswith(".") and len(first.perturbed) == 3 and first.answer in first.paraphrased
    assert task.forget[0].prompt == f"Question: {first.question}\nAnswer:" and task.forget[0].target == " " + \
        first.answer
    # forget05: half the forget facts; its retain95 is everything else that was taught (TOFU: full - forget)
    half = load_tofu(TofuSettings(data=str(data), split="forget05"))
    assert len(half.forget) + len(half.retain) == len(task.forget) + len(task.retain)
    assert any(n.startswith("tofu/forget_quality not computed") for n in task.notes)


def test_evaluate_values_follow_from_the_items(tiny, data: Path) -> None:
    model, tokenizer = tiny
    task = load_tofu(TofuSettings(data=str(data), limit=3, generation_tokens=4))
    metrics, items, samples = evaluate_items(lambda: task.evaluate(model, tokenizer, EvalConfig(), progress=False))
    for key in ("tofu/forget_prob", "tofu/forget_rouge", "tofu/forget_truth_ratio", *UTILITY_PARTS):
        assert key in metrics and 0 <= metrics[key] <= 1, key
        assert len(items[key]) == 3
    assert metrics["tofu/model_utility"] == pytest.approx(model_utility([metrics[k] for k in UTILITY_PARTS]))
    assert "tofu/forget_quality" not in metrics  # no retain model: not computed, never faked
    ratios = [row["truth_ratio"] for row in samples if row["metric"] == "tofu/forget_truth_ratio"]
    assert metrics["tofu/forget_truth_ratio"] == pytest.approx(forget_truth_ratio(ratios))
    probe = task.probe(model, tokenizer, EvalConfig())
    assert probe["tofu/forget_prob"] == pytest.approx(metrics["tofu/forget_prob"], rel=1e-6)


def test_forget_quality_from_a_retain_model_and_from_files(tiny, data: Path, tiny_model_dir: Path,
                                                           tokenizer, tmp_path: Path) -> None:
    from tests.conftest import make_model

    model = make_model(len(tokenizer))  # the weights saved in tiny_model_dir
    settings = dict(data=str(data), limit=3, generation_tokens=2)
    task = load_tofu(TofuSettings(**settings, retain_model=str(tiny_model_dir)))
    metrics, _, samples = evaluate_items(lambda: task.evaluate(model, tokenizer, EvalConfig(rouge=False),
                                                               progress=False))
    # scored against itself: the same truth ratios, so the KS test cannot tell them apart
    assert metrics["tofu/forget_ks"] == pytest.approx(0.0) and metrics["tofu/forget_quality"] == pytest.approx(1.0)
    assert "tofu/model_utility" not in metrics  # ROUGE was switched off: the harmonic mean lacks three values

    ratios = [row["truth_ratio"] for row in samples if row["metric"] == "tofu/forget_truth_ratio"]
    ours = tmp_path / "samples.jsonl"
    ours.write_text("".join(json.dumps(row) + "\n" for row in samples))
    ou = tmp_path / "TOFU_EVAL.json"
    ou.write_text(json.dumps({"forget_truth_ratio": {"value_by_index": {str(i): {"score": r}
                                                                         for i, r in enumerate(ratios)}}}))
    tofu = tmp_path / "eval_log_forget.json"  # TOFU stores losses: R = exp(paraphrased - mean perturbed)
    tofu.write_text(json.dumps({"avg_paraphrased_loss": {str(i): math.log(r) for i, r in enumerate(ratios)},
                                "average_perturb_loss": {str(i): [0.0, 0.0] for i in range(len(ratios))}}))
    for file in (ours, ou, tofu):
        from_file = load_tofu(TofuSettings(**settings, retain_stats=str(file)))
        assert from_file.retain_ratios == pytest.approx(ratios), file.name
    bad = tmp_path / "bad.json"
    bad.write_text('{"something": 1}')
    with pytest.raises(UserError, match="no forget truth ratios found"):
        load_tofu(TofuSettings(**settings, retain_stats=str(bad)))


def test_relearn_plan_holds_out_questions(data: Path) -> None:
    task = load_tofu(TofuSettings(data=str(data)))
    plan = task.relearn_plan("forget", 2, seed=0)
    unseen = {task.sets["forget"][i].question for i in plan.details["unseen_forget_indices"]}
    trained = {ex.prompt for ex in plan.train}
    assert len(plan.train) == 2 and not any(q in p for q in unseen for p in trained)
    assert plan.items is not None and plan.items.indices == plan.details["unseen_forget_indices"]


@pytest.mark.parametrize(("settings", "message"), [
    ({"split": "forget1"}, "benchmark.split must be forget01, forget05, forget10"),
    ({"data": "nowhere"}, "nowhere: not a directory"),
    ({"retain_model": " "}, "benchmark.retain_model must name a model or a file"),
])
def test_bad_settings(data: Path, settings: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_tofu(TofuSettings(**{"data": str(data), **settings}))


def test_malformed_and_missing_files(data: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "tofu"
    shutil.copytree(data, broken)
    (broken / "retain_perturbed.json").write_text(json.dumps([{"question": "q", "answer": "a",
                                                               "paraphrased_answer": "b", "perturbed_answer": 3}]))
    with pytest.raises(UserError, match=r"retain_perturbed.json: record 1: field 'perturbed_answer' must be"):
        load_tofu(TofuSettings(data=str(broken)))
    (broken / "retain_perturbed.json").unlink()
    with pytest.raises(UserError, match=r"retain_perturbed.json: file not found"):
        load_tofu(TofuSettings(data=str(broken)))
    shutil.copy(data / "retain_perturbed.json", broken)
    (broken / "world_facts_perturbed.json").unlink()
    task = load_tofu(TofuSettings(data=str(broken)))
    assert "wf" not in task.sets and any("world_facts_perturbed not found" in n for n in task.notes)


# ------------------------------------------------------------------------------------------ end to end


def test_eval_prints_every_metric(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    result = cli("eval", "--benchmark", "tofu", "--data", str(data), "--model", str(tiny_model_dir), *SHORT, "-q",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for key in ("tofu/forget_prob", "tofu/forget_rouge", "tofu/forget_truth_ratio", "tofu/model_utility",
                *UTILITY_PARTS):
        assert key in result.stdout, key
    assert "note: tofu/forget_quality not computed" in result.stdout


def test_run_then_attacks(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    result = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir), "--benchmark",
                 "tofu", "--data", str(data), *SHORT, "--set", f"benchmark.retain_model={tiny_model_dir}",
                 "--steps", "2", "--batch-size", "2", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "npo-adamw"
    record = json.loads((run / "metrics.json").read_text())
    assert record["benchmark"] == "tofu" and record["headline"] == "tofu/forget_prob"
    assert "tofu/forget_quality" in record["metrics"] and "tofu/model_utility" in record["target"]
    for attack, folder in ((["--quantize", "8bit"], "bnb-8bit"),
                           (["--relearn", "--steps", "1", "--checkpoints", "0,1", "--batch-size", "2"],
                            "relearn-steps1-batchsize2")):
        attacked = cli("attack", "--run", str(run), *attack, "-q", cwd=tmp_path)
        assert attacked.returncode == 0, attacked.stderr
        out = json.loads((run / "attacks" / folder / "metrics.json").read_text())
        assert "tofu/forget_prob" in out["metrics"]
    relearned = json.loads((run / "attacks" / "relearn-steps1-batchsize2" / "metrics.json").read_text())
    assert relearned["recovery"]["metric"] == "forget_unseen_prob"
    assert relearned["curve"][0]["forget_unseen_prob"] >= 0
    report = cli("report", "runs", cwd=tmp_path)
    assert report.returncode == 0 and "forget Prob ↓" in report.stdout, report.stderr


def test_cli_errors_are_one_line(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    result = cli("eval", "--benchmark", "tofu", "--data", str(data), "--model", str(tiny_model_dir),
                 "--set", "benchmark.split=forget1", cwd=tmp_path)
    assert_user_error(result, "benchmark.split must be forget01", tmp_path)
    result = cli("eval", "--benchmark", "tofu", "--model", str(tiny_model_dir), cwd=tmp_path)
    assert_user_error(result, "benchmark 'tofu' needs data", tmp_path)


def test_membership_inference_on_tofu(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    result = cli("attack", "--model", str(tiny_model_dir), "--attack", "mia", "--benchmark", "tofu", "--data",
                 str(data), "--set", "attack.scores=[loss,min_k]", "--set", "attack.resamples=100", "-q",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mia/loss_auc" in result.stdout and "mia/min_k_auc" in result.stdout
