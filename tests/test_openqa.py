"""Open-ended QA: the prompt, the normalized-match rule, the NLI judge and accuracy on a real generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unlearn.core.errors import UserError
from unlearn.evaluation.judge import SHOTS, MatchJudge, NLIJudge, match_judge, normalize, openqa_accuracy, openqa_prompt
from unlearn.evaluation.measures import generate_answers
from unlearn.tasks.data import MCQ

OPTIONS = ["Mars", "Venus", "the Red Sea", "Red"]


def test_prompt_shows_options_and_fixed_shots() -> None:
    prompt = openqa_prompt("  Which one?  ", ["x", "y"])
    assert prompt.endswith("Question: Which one?\nOptions: A. x; B. y\nAnswer:")
    assert prompt.count("Question:") == len(SHOTS) + 1
    assert "Answer: Mars" in prompt  # the shots answer with the option's text, not its letter


@pytest.mark.parametrize(("answer", "correct", "expected"), [
    ("Mars", 0, True),
    ("It is mars.", 0, True),  # case and punctuation do not matter
    ("B", 1, True), ("(B)", 1, True), ("Option B.", 1, True), ("A", 1, False),  # a bare letter names its option
    ("Mars or Venus", 0, False),  # hedging between options is wrong
    ("Red Sea", 2, True),  # articles dropped; "Red" inside the correct "Red Sea" is not a second option
    ("the red sea", 3, False),  # correct is "Red", but the answer names the other option "the Red Sea"
    ("Marsupial", 0, False),  # whole words only
    ("", 0, False), ("...", 0, False),
])
def test_match_rule(answer: str, correct: int, expected: bool) -> None:
    assert match_judge(answer, OPTIONS, correct) is expected


def test_normalize() -> None:
    assert normalize("The  Amber-Coast, an ISLE!") == ["amber", "coast", "isle"]


def _questions() -> list[MCQ]:
    return [MCQ("", ["A", "B", "C", "D"], 0, tag, f"What is item {i}?", [f"opt{i}", "zz", "yy", "xx"])
            for i, tag in enumerate(["alpha", "beta", "alpha", "beta"])]


def _teach(model, tokenizer, prompts: list[str], answer: str, steps: int = 40) -> None:
    """A few steps of fine-tuning so the tiny model writes `answer` after these prompts."""
    from unlearn.tasks.data import Example, collate, encode

    batch = collate([encode(tokenizer, Example(p, answer), max_length=2048) for p in prompts], tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
    model.eval()


def test_accuracy_on_what_the_model_writes(tiny) -> None:
    """The model is taught to answer "zebra": questions whose correct option is "zebra" count as right, the
    others as wrong, per tag; and the answers really are generated (an untaught model scores 0)."""
    model, tokenizer = tiny
    questions = _questions()
    for q in questions:
        q.options = ["zebra", "yak", "emu", "gnu"]
    questions[1].answer_index = questions[3].answer_index = 2  # the beta questions want "emu"
    assert openqa_accuracy(model, tokenizer, questions, MatchJudge(), max_new_tokens=6)["acc"] == 0.0
    _teach(model, tokenizer, [openqa_prompt(q.question, q.options) for q in questions], " zebra\n")
    prompt = openqa_prompt(questions[0].question, questions[0].options)
    assert generate_answers(model, tokenizer, [prompt], 6) == ["zebra"]
    result = openqa_accuracy(model, tokenizer, questions, MatchJudge(), max_new_tokens=6)
    assert result == {"acc": 0.5, "acc/alpha": 1.0, "acc/beta": 0.0}


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3, pad_token_id=0,
                        id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},
                        label2id={"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2})
    folder = tmp_path_factory.mktemp("nli")
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_nli_judge_decides_by_its_entailment_label(nli_dir: Path) -> None:
    judge = NLIJudge(str(nli_dir), batch_size=3)
    questions = _questions()
    answers = ["opt0", "something else", "yy", "opt3 indeed"]
    decisions = judge(questions, answers)
    expected = []
    for q, a in zip(questions, answers, strict=True):  # one pair at a time: no padding at all
        enc = judge.tokenizer(f"{q.question} {a}", f"{q.question} {q.options[0]}", return_tensors="pt")
        with torch.no_grad():
            expected.append(int(judge.model(**enc).logits.argmax(-1)) == 2)
    assert decisions == expected


def test_nli_judge_errors(tmp_path: Path, nli_dir: Path) -> None:
    with pytest.raises(UserError, match="cannot load NLI judge"):
        NLIJudge(str(tmp_path / "missing"))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(nli_dir)
    config.id2label = {0: "yes", 1: "no", 2: "maybe"}
    config.label2id = {"yes": 0, "no": 1, "maybe": 2}
    config.save_pretrained(nli_dir.parent / "nli_bad")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (nli_dir / name).is_file():
            (nli_dir.parent / "nli_bad" / name).write_bytes((nli_dir / name).read_bytes())
    with pytest.raises(UserError, match="no single 'entailment' label"):
        NLIJudge(str(nli_dir.parent / "nli_bad"))
