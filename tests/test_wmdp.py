"""WMDP / MMLU / open-ended QA on local files: the in-loop scorer against lm-eval-harness, formats, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import cli
from unlearn.benchmarks.example_data import write_jsonl
from unlearn.benchmarks.wmdp import QuestionSet, lm_eval_accuracy, render
from unlearn.core.errors import UserError
from unlearn.evaluation.measures import choice_scores
from unlearn.tasks.task import load_task
from unlearn.training.config import EvalConfig

CONCEPTS = ("virology", "toxins", "genetics")


def load(config: dict) -> object:
    """The wmdp benchmark from a `benchmark` section, loaded as a run loads it."""
    return load_task({"name": "wmdp", **config})


def _records(n: int = 12) -> list[dict]:
    return [{"question": f"  Which agent number {i} is meant?  ", "choices": [f"agent {i}", f"agent {i + 1}",
             f"toxin {2 * i}", f"none of {i}"], "answer": 0, "concept": CONCEPTS[i % 3]} for i in range(n)]


def _answers_from_model(model, tokenizer, records: list[dict], path: Path, description: str = "") -> list[dict]:
    """Set each answer to the model's own choice for even questions and to another option for odd ones, so
    both scorers must agree on every ranking to report exactly 0.5."""
    qs = QuestionSet("wmdp", str(path), None, "concept", None)
    write_jsonl(path, records)
    scores = choice_scores(model, tokenizer, qs.questions())
    for i, (record, s) in enumerate(zip(records, scores, strict=True)):
        best = max(range(4), key=s.__getitem__)
        record["answer"] = best if i % 2 == 0 else (best + 1) % 4
    write_jsonl(path, records)
    return records


def test_prompt_is_lm_eval_wmdp_template() -> None:
    text = render("  Why?  ", ["a", "b", "c", "d"], "The following are multiple choice questions (with answers) "
                  "about biology.\n\n")
    assert text == ("The following are multiple choice questions (with answers) about biology.\n\n"
                    "Why?\nA. a\nB. b\nC. c\nD. d\nAnswer:")


def test_in_loop_scorer_equals_lm_eval(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    path = tmp_path / "wmdp_bio.jsonl"  # the name gives it WMDP-bio's description, as lm-eval's task has
    _answers_from_model(model, tokenizer, _records(), path)
    task = load({"data": str(path)})
    assert task.questions.subject == "biology"
    native = task.evaluate(model, tokenizer, EvalConfig(engine="native"), progress=False)
    reference = task.evaluate(model, tokenizer, EvalConfig(engine="lm-eval", batch_size=5), progress=False)
    assert native["wmdp/acc"] == 0.5
    assert native == reference  # overall and per concept, exactly
    assert set(native) == {"wmdp/acc"} | {f"wmdp/acc/{c}" for c in CONCEPTS}


def test_formats_and_mmlu_style_utility_agree_across_engines(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    records = _answers_from_model(model, tokenizer, _records(8), tmp_path / "q.jsonl")
    (tmp_path / "q.json").write_text(json.dumps(records))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "q.parquet")
    mmlu = [dict(r, subject=["high_school_biology", "anatomy"][i % 2]) for i, r in enumerate(_records(6))]
    write_jsonl(tmp_path / "mmlu.jsonl", mmlu)
    tasks = {suffix: load({"data": str(tmp_path / f"q.{suffix}"), "utility": str(tmp_path / "mmlu.jsonl")})
             for suffix in ("jsonl", "json", "parquet")}
    # The three formats read as the same questions, so they score alike; the native scores of each are the
    # same numbers, and lm-eval agrees with them (lm-eval's start-up is most of this test: run once).
    assert tasks["json"].questions.questions() == tasks["jsonl"].questions.questions()
    assert tasks["parquet"].questions.questions() == tasks["jsonl"].questions.questions()
    scores = {suffix: task.evaluate(model, tokenizer, EvalConfig(engine="native"), progress=False)
              for suffix, task in tasks.items()}
    assert scores["json"] == scores["jsonl"] == scores["parquet"]
    task = tasks["parquet"]
    # per-record subjects give per-record descriptions, as lm-eval's per-subject MMLU tasks
    assert "about high school biology." in task.utility.questions()[0].prompt
    reference = lm_eval_accuracy(model, tokenizer, [task.questions, task.utility], 16, progress=False)
    assert scores["parquet"] == reference
    assert {"mmlu/acc/anatomy", "mmlu/acc/high_school_biology"} <= set(reference)


def test_limit_and_notes(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "q.jsonl", _records(10))
    task = load({"data": str(tmp_path / "q.jsonl"), "limit": 4})
    assert len(task.questions.questions()) == 4
    assert task.utility is None and any("MMLU" in n for n in task.notes)  # said, not silently skipped
    assert task.forget == []  # no corpus: evaluation only


def test_corpora_become_passages(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "q.jsonl", _records(4))
    write_jsonl(tmp_path / "forget.jsonl", [{"text": " ".join(f"w{i}" for i in range(25))}, {"text": "short one"}])
    write_jsonl(tmp_path / "retain.jsonl", [{"text": "kept text"}])
    task = load({"data": str(tmp_path / "q.jsonl"), "forget_corpus": str(tmp_path / "forget.jsonl"),
                 "retain_corpus": str(tmp_path / "retain.jsonl"), "chunk_words": 10})
    assert [len(e.target.split()) for e in task.forget] == [10, 10, 5, 2]
    assert [e.target for e in task.retain] == ["kept text"]
    other = load({"data": str(tmp_path / "q.jsonl"), "forget_corpus": str(tmp_path / "forget.jsonl"),
                  "retain_corpus": str(tmp_path / "retain.jsonl"), "chunk_words": 12})
    assert other.fingerprint != task.fingerprint


@pytest.mark.parametrize(("config", "message"), [
    ({}, "needs questions: pass --data"),
    ({"data": "nope.jsonl"}, "nope.jsonl: file not found"),
    ({"data": "Q", "colour": 1}, "unknown key(s) in benchmark 'wmdp': colour"),
    ({"data": "Q", "limit": 0}, "benchmark.limit must be an integer (or null) >= 1"),
    ({"data": "Q", "forget_corpus": "Q", "retain_corpus": "Q"}, "record 1: missing field 'text'"),
])
def test_config_errors(tmp_path: Path, config: dict, message: str) -> None:
    write_jsonl(tmp_path / "q.jsonl", _records(2))
    config = {k: str(tmp_path / "q.jsonl") if v == "Q" else v for k, v in config.items()}
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(config)


def test_wikitext_offline_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    write_jsonl(tmp_path / "q.jsonl", _records(2))
    write_jsonl(tmp_path / "f.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match="retain corpus 'wikitext'.*local file"):
        load({"data": str(tmp_path / "q.jsonl"), "forget_corpus": str(tmp_path / "f.jsonl")})
    with pytest.raises(UserError, match="cannot load 'wmdp_bio'.*local file"):
        load({"data": "wmdp_bio"}).questions.questions()


def test_lm_eval_engine_needs_one_choice_count(tiny, tmp_path: Path) -> None:
    records = _records(3)
    records[1]["choices"] = records[1]["choices"][:3]
    write_jsonl(tmp_path / "q.jsonl", records)
    task = load({"data": str(tmp_path / "q.jsonl")})
    with pytest.raises(UserError, match="same number of choices"):
        task.evaluate(*tiny, EvalConfig(engine="lm-eval"), progress=False)
    # the in-loop scorer has no template to share, so mixed counts are fine there
    assert "wmdp/acc" in task.evaluate(*tiny, EvalConfig(engine="native"), progress=False)
    with pytest.raises(UserError, match="unknown eval.engine 'fast'"):
        task.evaluate(*tiny, EvalConfig(engine="fast"), progress=False)


def test_cli_eval_on_local_file_and_malformed_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_jsonl(tmp_path / "q.jsonl", _records(6))
    result = cli("eval", "--benchmark", "wmdp", "--data", "q.jsonl", "--model", str(tiny_model_dir),
                 "--engine", "native", "--openqa", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for key in ("wmdp/acc", "wmdp/acc/virology", "wmdp/openqa_acc", "wmdp/openqa_acc/genetics"):
        assert key in result.stdout
    assert "note: utility (MMLU) not measured" in result.stdout

    bad = _records(2)
    del bad[1]["answer"]
    write_jsonl(tmp_path / "bad.jsonl", bad)
    result = cli("eval", "--benchmark", "wmdp", "--data", "bad.jsonl", "--model", str(tiny_model_dir), "-q",
                 cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.jsonl'}: record 2: missing field 'answer'"]


def test_one_forward_per_question_gives_the_per_choice_scores(monkeypatch) -> None:
    """Letter choices are read off one next-token distribution; that must equal scoring each choice as its
    own continuation, also when single-token and multi-token questions are mixed in one call."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import make_model
    from unlearn.evaluation import measures as evaluate
    from unlearn.tasks.data import MCQ, Example, encode, fixed_batches
    from unlearn.tasks.scoring import sequence_logprobs

    # A tokenizer where " A" ... " D" are single tokens, as in BPE vocabularies (the fixture's is per character).
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f" {c}": 3 + i for i, c in enumerate("ABCD")}}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(" [A-D]|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    model = make_model(len(tokenizer))
    assert tokenizer(" B", add_special_tokens=False).input_ids == [4]
    calls = []
    real = evaluate._next_token_scores
    monkeypatch.setattr(evaluate, "_next_token_scores", lambda *a: calls.append(len(a[1])) or real(*a))

    letters = [MCQ(f"Question {i}?\nAnswer:", ["A", "B", "C", "D"], 0, "") for i in range(5)]
    words = [MCQ(f"Name {i}:", ["alpha", "be", "c"], 0, "") for i in range(3)]
    questions = [letters[0], words[0], *letters[1:3], *words[1:], *letters[3:]]
    fast = choice_scores(model, tokenizer, questions, batch_size=3)
    items = [encode(tokenizer, Example(q.prompt, " " + c), add_eos=False) for q in questions for c in q.choices]
    flat = torch.cat([sequence_logprobs(model, b)[0] for b in fixed_batches(items, 4, tokenizer.pad_token_id)])
    expected, start = [], 0
    for q in questions:
        expected.append(flat[start:start + len(q.choices)].tolist())
        start += len(q.choices)
    assert calls == [5]  # the five letter questions took the one-forward path, the word questions did not
    assert [len(s) for s in fast] == [len(q.choices) for q in questions]
    for got, want in zip(fast, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_long_questions_are_scored_whole_and_cut_from_the_left(tiny) -> None:
    """A WMDP question can be a long code listing: the native scorer scores it whole (no fixed-length cut), and
    only past the model's context drops tokens from the left, as lm-eval does."""
    from unlearn.tasks.data import MCQ

    model, tokenizer = tiny
    question = MCQ("int f(char *p) { return p[3]; }\n" * 12 + "Answer:", ["A", "B", "C", "D"], 0, "")
    prompt_ids = tokenizer(question.prompt, add_special_tokens=False).input_ids
    assert len(prompt_ids) > 300

    def direct(context: int) -> list[float]:
        out = []
        for choice in question.choices:
            cont = tokenizer(" " + choice, add_special_tokens=False).input_ids
            ids = (prompt_ids + cont)[-context:]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
            targets = torch.tensor(ids[1:])
            out.append(float(logp.gather(-1, targets[:, None]).squeeze(-1)[-len(cont):].sum()))
        return out

    model.config.max_position_embeddings = 4096  # rotary positions: the tiny model takes the whole question
    assert choice_scores(model, tokenizer, [question])[0] == pytest.approx(direct(4096), abs=1e-3)
    model.config.max_position_embeddings = 256
    assert choice_scores(model, tokenizer, [question])[0] == pytest.approx(direct(256), abs=1e-3)


def test_length_batches_sort_budget_and_restore_order() -> None:
    from unlearn.evaluation.measures import length_batches

    lengths = [5, 50, 7, 50, 1, 30]
    batches = length_batches(lengths, batch_size=3, max_tokens=100)
    assert batches == [[1, 3], [5, 2, 0], [4]]  # longest first; 3 x 50 > 100 tokens; ties keep input order
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert length_batches([500, 3], batch_size=8, max_tokens=100) == [[0], [1]]  # too long alone: its own batch
    assert length_batches(lengths, batch_size=2) == [[1, 3], [5, 2], [0, 4]]  # rows only


def test_eleven_choices_are_scored_alike_on_both_engines_and_27_are_refused(tiny, tmp_path: Path) -> None:
    """MMLU-style files sometimes have 5+ choices; 11 used to raise an IndexError on both engines (letters A-J)."""
    model, tokenizer = tiny
    path = tmp_path / "eleven.jsonl"
    records = [{"question": f"Which of these is number {i}?", "choices": [f"option {i + k}" for k in range(11)],
                "answer": 0} for i in range(6)]
    write_jsonl(path, records)
    scores = choice_scores(model, tokenizer, QuestionSet("wmdp", str(path), None, None, None).questions())
    for i, (record, s) in enumerate(zip(records, scores, strict=True)):
        best = max(range(11), key=s.__getitem__)
        record["answer"] = best if i % 2 == 0 else (best + 1) % 11
    write_jsonl(path, records)
    task = load({"data": str(path)})
    assert "K. option" in task.questions.questions()[0].prompt
    native = task.evaluate(model, tokenizer, EvalConfig(engine="native"), progress=False)
    reference = task.evaluate(model, tokenizer, EvalConfig(engine="lm-eval", batch_size=4), progress=False)
    assert native["wmdp/acc"] == 0.5 and native == reference
    write_jsonl(path, [{"question": "Too many?", "choices": [str(k) for k in range(27)], "answer": 0}])
    with pytest.raises(UserError, match="has 27 choices; at most 26"):
        load({"data": str(path)}).questions.questions()


def test_the_lm_eval_batch_is_capped_by_the_token_budget(tiny, tmp_path: Path) -> None:
    """Four 10,000-character questions at lm-eval's batch of 64 ran out of 6 GB: its batch follows the budget."""
    model, tokenizer = tiny
    short, long = tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    write_jsonl(short, _records(4))
    write_jsonl(long, [{"question": "word " * 2000 + f"{i}?", "choices": ["a", "b", "c", "d"], "answer": 0}
                       for i in range(4)])
    from unlearn.benchmarks.wmdp import lm_eval_batch_size

    sets = {name: QuestionSet("wmdp", str(path), None, None, None) for name, path in (("short", short),
                                                                                        ("long", long))}
    assert lm_eval_batch_size(model, tokenizer, [sets["short"]], 16, 2048) == 16
    # Longer than the model takes: lm-eval cuts it to the model's length, so that is what a request costs.
    positions = model.config.max_position_embeddings
    assert lm_eval_batch_size(model, tokenizer, [sets["long"]], 64, 2048) == 2048 // positions
    assert lm_eval_batch_size(model, tokenizer, [sets["long"]], 64, 100) == 1
    assert lm_eval_batch_size(model, tokenizer, [sets["short"], sets["long"]], 64, None) == 64
    metrics = load({"data": str(long)}).evaluate(model, tokenizer, EvalConfig(engine="lm-eval"), progress=False)
    assert 0.0 <= metrics["wmdp/acc"] <= 1.0
