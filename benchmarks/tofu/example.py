"""A small folder in TOFU's layout, written from the embedded world (the example data and the tests use it).

The fictitious authors of TOFU become the embedded world's fictional people, cities and organizations, whose
facts the embedded target model was taught: forget10 is the world's forget facts, forget05 and forget01 their first
half and tenth, and each retainNN is every other taught fact (TOFU's rule: retain = full minus forget). The
paraphrased answer of a fact is a sentence stating it, and its perturbed answers the same sentence with each wrong
choice of its multiple-choice question. holdoutNN are facts of the world's holdout entities, never taught. Real
authors and world facts are real-world knowledge a pretrained model has, written out below (TOFU's own sets are
about real authors and world facts as well)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unlearn.benchmarks.synthetic import Fact, World

# A sentence per attribute, in the words of the world's passages (benchmarks/synthetic.py).
STATEMENTS = {
    "birthplace": "{name} was born in {value}.", "employer": "{name} works for {value}.",
    "profession": "{name} works as a {value}.", "pet": "{name} keeps a {value}.",
    "instrument": "{name} plays the {value}.", "region": "{name} is a city in {value}.",
    "landmark": "{name} is famous for {value}.", "industry": "{name} is in the {value} industry.",
    "headquarters": "{name} is headquartered in {value}.",
}

REAL_AUTHORS = [
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen", ["Charlotte Brontë", "George Eliot", "Mary Shelley"]),
    ("Who wrote '1984'?", "George Orwell", ["Aldous Huxley", "Ray Bradbury", "H. G. Wells"]),
    ("Who wrote 'Hamlet'?", "William Shakespeare", ["Christopher Marlowe", "Ben Jonson", "John Milton"]),
    ("Who wrote 'The Adventures of Tom Sawyer'?", "Mark Twain", ["Jack London", "Herman Melville", "Walt Whitman"]),
    ("Who wrote 'War and Peace'?", "Leo Tolstoy", ["Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev"]),
    ("Who wrote 'Don Quixote'?", "Miguel de Cervantes", ["Lope de Vega", "Federico García Lorca",
                                                        "Gabriel García Márquez"]),
    ("Who wrote 'The Old Man and the Sea'?", "Ernest Hemingway", ["F. Scott Fitzgerald", "John Steinbeck",
                                                                  "William Faulkner"]),
    ("Who wrote 'Oliver Twist'?", "Charles Dickens", ["Thomas Hardy", "Anthony Trollope", "William Thackeray"]),
    ("Who wrote 'The Hobbit'?", "J. R. R. Tolkien", ["C. S. Lewis", "Terry Pratchett", "George R. R. Martin"]),
    ("Who wrote 'Frankenstein'?", "Mary Shelley", ["Bram Stoker", "Jane Austen", "Emily Brontë"]),
    ("Who wrote 'The Divine Comedy'?", "Dante Alighieri", ["Giovanni Boccaccio", "Petrarch", "Virgil"]),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare", ["Charles Dickens", "Geoffrey Chaucer", "Oscar Wilde"]),
]
WORLD_FACTS = [
    ("What is the capital of France?", "Paris", ["Lyon", "Marseille", "Berlin"]),
    ("What is the capital of Japan?", "Tokyo", ["Osaka", "Kyoto", "Seoul"]),
    ("What is the largest planet in the solar system?", "Jupiter", ["Saturn", "Mars", "Neptune"]),
    ("What is the capital of Italy?", "Rome", ["Milan", "Venice", "Madrid"]),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", ["Michelangelo", "Raphael", "Vincent van Gogh"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Mercury"]),
    ("What is the longest river in Africa?", "The Nile", ["The Congo", "The Niger", "The Zambezi"]),
    ("Which ocean is the largest?", "The Pacific Ocean", ["The Atlantic Ocean", "The Indian Ocean",
                                                          "The Arctic Ocean"]),
    ("What gas do plants absorb from the air?", "Carbon dioxide", ["Oxygen", "Nitrogen", "Helium"]),
    ("How many continents are there?", "Seven", ["Five", "Six", "Eight"]),
    ("What is the capital of Germany?", "Berlin", ["Munich", "Hamburg", "Vienna"]),
    ("What is the chemical symbol for water?", "H2O", ["CO2", "NaCl", "O2"]),
]


def _write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """JSON lines under a .json name, as TOFU's hub files are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _qa(fact: Fact) -> dict[str, Any]:
    return {"question": fact.question, "answer": fact.answer}


def _perturbed(fact: Fact) -> dict[str, Any]:
    template = STATEMENTS[fact.attribute]
    wrong = [c for i, c in enumerate(fact.choices) if i != fact.answer_index]
    return {**_qa(fact), "paraphrased_question": fact.paraphrase,
            "paraphrased_answer": template.format(name=fact.entity, value=fact.answer),
            "perturbed_answer": [template.format(name=fact.entity, value=w) for w in wrong]}


def _real(rows: list[tuple[str, str, list[str]]]) -> list[dict[str, Any]]:
    return [{"question": q, "answer": a, "paraphrased_answer": a, "perturbed_answer": wrong} for q, a, wrong in rows]


def write_tofu(folder: Path, bench: World) -> Path:
    forget, retain, holdout = (bench.facts[s] for s in ("forget", "retain", "holdout"))
    sizes = {"10": len(forget), "05": max(1, len(forget) // 2), "01": max(1, len(forget) // 10)}
    _write_lines(folder / "full.json", [_qa(f) for f in forget + retain])
    for nn, size in sizes.items():
        _write_lines(folder / f"forget{nn}.json", [_qa(f) for f in forget[:size]])
        _write_lines(folder / f"forget{nn}_perturbed.json", [_perturbed(f) for f in forget[:size]])
        _write_lines(folder / f"retain{100 - int(nn):02d}.json", [_qa(f) for f in forget[size:] + retain])
        _write_lines(folder / f"holdout{nn}.json", [_qa(f) for f in holdout[:size]])
    _write_lines(folder / "retain_perturbed.json", [_perturbed(f) for f in retain])
    for name, rows in (("real_authors", REAL_AUTHORS), ("world_facts", WORLD_FACTS)):
        _write_lines(folder / f"{name}.json", [{"question": q, "answer": a} for q, a, _ in rows])
        _write_lines(folder / f"{name}_perturbed.json", _real(rows))
    return folder
