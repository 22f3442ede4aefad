"""Open-ended QA: the model answers multiple-choice questions in its own words.

MCQ accuracy can overstate forgetting: a model may lose the letter-picking habit yet still *say* the
answer. Here the options are shown, but the model must write the answer out; the answer is then judged
against the correct option, by an NLI entailment model when the user names one, else by a normalized
string match whose rule fits in a sentence (see `match_judge`).

The few-shot examples are fixed general-knowledge questions, not items from the evaluated file: taking
shots from a forget set would put forget knowledge into the prompt.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from unlearn.core.errors import UserError
from unlearn.tasks.data import ANSWER_LETTERS, MCQ

LETTERS = ANSWER_LETTERS
INSTRUCTION = "Answer each question with the text of the correct option."
SHOTS = (
    ("Which planet is known as the Red Planet?", ["Venus", "Mars", "Jupiter", "Saturn"], 1),
    ("What is the chemical symbol for sodium?", ["S", "So", "Na", "Sd"], 2),
    ("Which organ pumps blood through the human body?", ["Heart", "Liver", "Lung", "Kidney"], 0),
)


def options_line(options: Sequence[str]) -> str:
    return "Options: " + "; ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def openqa_prompt(question: str, options: Sequence[str], shots: int = len(SHOTS)) -> str:
    blocks = [INSTRUCTION]
    for q, opts, answer in SHOTS[:shots]:
        blocks.append(f"Question: {q}\n{options_line(opts)}\nAnswer: {opts[answer]}")
    blocks.append(f"Question: {question.strip()}\n{options_line(options)}\nAnswer:")
    return "\n\n".join(blocks)


_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> list[str]:
    """Lower case, Unicode-normalized, punctuation and articles dropped: the words that carry the answer."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return [w for w in text.split() if w not in _ARTICLES]


def _contains(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(words[i:i + n] == phrase for i in range(len(words) - n + 1))


_LETTER_ONLY = re.compile(r"^\(?(?:option\s+)?([A-Z])\)?[.:]?$", re.IGNORECASE)


def match_judge(answer: str, options: Sequence[str], correct: int) -> bool:
    """Correct iff the answer names the correct option and no other one.

    "Names" means: the answer is just that option's letter ("B", "(B)", "Option B."), or the option's
    normalized words appear in the answer's normalized words as a contiguous run. Naming a second option
    too (hedging: "Mars or Venus") is wrong, unless that option's words are part of the correct one's.
    """
    letter = _LETTER_ONLY.match(answer.strip())
    if letter and len(options) <= len(LETTERS):
        return LETTERS.index(letter.group(1).upper()) == correct
    words = normalize(answer)
    target = normalize(options[correct])
    if not _contains(words, target):
        return False
    for index, option in enumerate(options):
        other = normalize(option)
        if index != correct and other != target and not _contains(target, other) and _contains(words, other):
            return False
    return True


class Judge(Protocol):
    name: str

    def __call__(self, questions: Sequence[MCQ], answers: Sequence[str]) -> list[bool]: ...


class MatchJudge:
    name = "normalized match"

    def __call__(self, questions: Sequence[MCQ], answers: Sequence[str]) -> list[bool]:
        return [match_judge(a, q.options, q.answer_index) for q, a in zip(questions, answers, strict=True)]


class NLIJudge:
    """Correct iff an NLI model finds that the model's answer entails the correct option.

    Premise: the question and the model's answer. Hypothesis: the question and the correct option. The
    decision is the model's argmax label being its entailment label.
    """

    def __init__(self, spec: str, batch_size: int = 32, trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from unlearn.compute.models import hub_access, load_error, load_errors, resolve

        try:
            source = resolve(spec)  # a local folder must hold config.json and safetensors weights
        except UserError as err:
            raise UserError(f"cannot load NLI judge: {err}") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                           **hub_access(source))
            self.model = AutoModelForSequenceClassification.from_pretrained(
                source, use_safetensors=True, trust_remote_code=trust_remote_code, **hub_access(source)).eval()
        except load_errors() as err:
            raise load_error(spec, err, "NLI judge") from None
        labels = {int(i): str(name).lower() for i, name in self.model.config.id2label.items()}
        entail = [i for i, name in labels.items() if name.startswith("entail")]
        if len(entail) != 1:
            raise UserError(f"NLI judge '{spec}' has no single 'entailment' label (labels: {sorted(labels.values())})")
        self.entailment = entail[0]
        # Right padding keeps every pair at the positions it has alone: decisions must not depend on batching.
        self.tokenizer.padding_side = "right"
        self.batch_size = batch_size
        self.name = f"NLI ({spec})"

    @torch.no_grad()
    def __call__(self, questions: Sequence[MCQ], answers: Sequence[str]) -> list[bool]:
        premises = [f"{q.question.strip()} {a}" for q, a in zip(questions, answers, strict=True)]
        hypotheses = [f"{q.question.strip()} {q.options[q.answer_index]}" for q in questions]
        out: list[bool] = []
        for start in range(0, len(premises), self.batch_size):
            enc = self.tokenizer(premises[start:start + self.batch_size], hypotheses[start:start + self.batch_size],
                                 return_tensors="pt", padding=True, truncation=True)
            logits = self.model(**enc).logits
            out.extend(bool(x) for x in (logits.argmax(-1) == self.entailment).tolist())
        return out


def make_judge(spec: str | None, trust_remote_code: bool = False) -> Judge:
    return NLIJudge(spec, trust_remote_code=trust_remote_code) if spec else MatchJudge()


def openqa_accuracy(model: Any, tokenizer: Any, questions: Sequence[MCQ], judge: Judge,
                    max_new_tokens: int = 32, batch_size: int = 32,
                    max_batch_tokens: int | None = None) -> dict[str, float]:
    """Open-ended accuracy overall and per tag (`acc`, `acc/<tag>`), like `mcq_accuracy`."""
    from unlearn.evaluation.measures import collecting_samples, generate_answers, log_samples, tagged_accuracy

    if not questions:
        return {}
    for q in questions:
        if not q.options:
            raise ValueError("open-ended QA needs each question's raw options (MCQ.options)")
    prompts = [openqa_prompt(q.question, q.options) for q in questions]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, max_batch_tokens)
    verdicts = judge(questions, answers)
    if collecting_samples():
        log_samples([{"prompt": p, "gold": q.options[q.answer_index], "generation": a, "correct": ok,
                      "judge": judge.name, "concept": q.tag}
                     for p, q, a, ok in zip(prompts, questions, answers, verdicts, strict=True)])
    return tagged_accuracy([q.tag for q in questions], verdicts)
