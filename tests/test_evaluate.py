"""Evaluation edge cases."""

import math

import pytest
import torch

from unlearn.evaluation.measures import (
    answer_probability,
    collect_samples,
    item_values,
    mcq_accuracy,
    perplexity,
    run_steps,
)
from unlearn.tasks.data import MCQ


def test_perplexity_of_a_wrecked_model_is_inf_not_a_crash(tiny):
    model, tok = tiny
    texts = ["Bo keeps a ferret."]
    assert 1.0 < perplexity(model, tok, texts) < 1e3
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e6)  # logits so extreme that mean NLL exceeds ~709
    assert perplexity(model, tok, texts) == math.inf


def test_answer_probability_is_the_per_token_share_of_the_answer() -> None:
    """Two choices of 1 and 2 tokens with per-token log-likelihoods -1 and -2 (sums -1 and -4): the answer's share
    is e^-1 / (e^-1 + e^-2); equal per-token scores give 1/len(choices) whatever the lengths."""
    assert answer_probability([-1.0, -4.0], [1, 2], 0) == pytest.approx(math.exp(-1) / (math.exp(-1) + math.exp(-2)))
    assert answer_probability([-3.0, -6.0, -9.0, -3.0], [1, 2, 3, 1], 2) == pytest.approx(0.25)


def test_mcq_prob_and_accuracy_come_from_one_scoring_and_items_match_the_means(tiny) -> None:
    model, tok = tiny
    questions = [MCQ(f"Q{i}:", ["ferret", "owl", "cello", "harp"], i % 4, "pet") for i in range(6)]
    with collect_samples() as samples:
        metrics = run_steps([("forget/mcq", lambda: mcq_accuracy(model, tok, questions, prob=True))], progress=False)
    items = item_values(samples, metrics)
    assert set(items) == {"forget/mcq_acc", "forget/mcq_prob"}
    assert sum(items["forget/mcq_acc"]) / 6 == pytest.approx(metrics["forget/mcq_acc"])
    assert sum(items["forget/mcq_prob"]) / 6 == pytest.approx(metrics["forget/mcq_prob"])
    assert all(0 < p < 1 for p in items["forget/mcq_prob"])
    # A metric whose value is not the mean of the rows under its tag gets no per-item values.
    assert item_values(samples, {"forget/mcq_acc": metrics["forget/mcq_acc"] + 0.5}) == {}


def test_choices_scored_from_a_shared_prompt_equal_whole_sequences(tiny) -> None:
    """Multi-token choices continue their question's cached prompt (left-padded, batched across questions of
    different lengths and choice counts): each summed log-likelihood equals scoring prompt + choice in one piece."""
    from unlearn.evaluation.measures import _scoring_item, choice_scores
    from unlearn.tasks.data import collate
    from unlearn.tasks.scoring import sequence_logprobs

    model, tok = tiny
    questions = [MCQ("Where was Bo Tranth born? A:", ["Kraizo", "Pl", "Drouvaelnd", "Sty"], 0, ""),
                 MCQ("Q: pet?", ["ferret", "owl"], 1, ""),
                 MCQ("What is the profession of Zaerk Quoumai, the one from the hills?",
                     ["glassblower", "x", "locksmith"], 2, "")]
    got = choice_scores(model, tok, questions, batch_size=2, max_batch_tokens=None)
    for q, scores in zip(questions, got, strict=True):
        assert len(scores) == len(q.choices)
        for choice, score in zip(q.choices, scores, strict=True):
            item = _scoring_item(tok, q.prompt, " " + choice, None)
            want = sequence_logprobs(model, collate([item], tok.pad_token_id))[0][0].item()
            assert score == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_eval_of_a_run_rewrites_its_record_collapse_and_items(tmp_path, tiny_model_dir):
    """`unlearn eval --run` used to write metrics.json as a raw dict: the run's collapse verdict and items.json kept
    the values of before. Now the record goes through RunRecord: a stale verdict and stale per-item values are
    replaced by the new evaluation's (of the same model here, so they equal what the run itself wrote)."""
    import json

    from tests.conftest import TINY_BENCH, cli

    made = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir), "--steps", "2",
               "--batch-size", "2", "--name", "r", "-q", *TINY_BENCH, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    run = tmp_path / "runs" / "r"
    record, items = (json.loads((run / n).read_text()) for n in ("metrics.json", "items.json"))
    stale = record | {"collapse": ["a stale verdict"], "collapsed": True}
    (run / "metrics.json").write_text(json.dumps(stale))
    (run / "items.json").write_text(json.dumps(items | {"unlearned": {k: [0.0] * len(v)
                                                                      for k, v in items["unlearned"].items()}}))
    evaluated = cli("eval", "--run", str(run), "-q", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    after, items_after = (json.loads((run / n).read_text()) for n in ("metrics.json", "items.json"))
    assert after["collapse"] == record["collapse"] and after["collapsed"] == record["collapsed"]
    assert after["metrics"] == record["metrics"] and after["train"] == record["train"]
    assert items_after == items
