"""Benchmark records from local files (jsonl, json, parquet), validated field by field.

Real benchmarks arrive as files users place on disk (WMDP-style ``{question, choices, answer}`` MCQs, MUSE's
JSON lists, forget corpora of ``{text}``). Every problem is reported as one line naming the file, the record
and the field, so a malformed download is fixed in seconds rather than debugged from a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unlearn.core.errors import UserError, shown
from unlearn.core.files import loads_json, read_text
from unlearn.tasks.data import ANSWER_LETTERS, MCQ

SUFFIXES = (".jsonl", ".json", ".parquet")


def _read_jsonl(path: Path) -> list[Any]:
    records = []
    for number, line in enumerate(read_text(path, "data file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(loads_json(line, f"{path}: line {number}"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
    return records


def _read_json(path: Path) -> list[Any]:
    try:
        data = loads_json(read_text(path, "data file"), str(path))
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and err.lineno > 1:  # JSON lines under a .json name, as TOFU's hub files are
            return _read_jsonl(path)
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow.parquet as pq  # a dependency of datasets

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({type(err).__name__})") from None


_READERS: dict[str, Callable[[Path], list[Any]]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def read_records(path: Path) -> list[Any]:
    """The records of a jsonl, json (a list) or parquet file; a one-line ``UserError`` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise UserError(f"{path}: not a regular file")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(SUFFIXES)}")
    records = reader(path)
    if not records:
        raise UserError(f"{path}: no records")
    return records


def mcq_from_record(record: Any, where: str, tag_field: str | None = None) -> tuple[str, list[str], int, str]:
    """(question, choices, answer index, tag) of one WMDP-style record, checked field by field."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with question, choices, answer; got {type(record).__name__}")
    for field in ("question", "choices", "answer"):
        if field not in record:
            raise UserError(f"{where}: missing field '{field}'")
    question, choices, answer = record["question"], record["choices"], record["answer"]
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: field 'question' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where}: field 'choices' must be a list of at least 2 strings")
    if len(choices) > len(ANSWER_LETTERS):
        raise UserError(f"{where}: field 'choices' has {len(choices)} choices; at most {len(ANSWER_LETTERS)} (they are "
                        f"labelled {ANSWER_LETTERS[0]}-{ANSWER_LETTERS[-1]} in the prompt)")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(f"{where}: field 'answer' must be an integer index into choices (0..{len(choices) - 1}), "
                        f"got {shown(answer)}")
    tag = ""
    if tag_field is not None and record.get(tag_field) is not None:
        tag = str(record[tag_field])
    return question, choices, answer, tag


def mcqs_from(records: list[Any], where: str, prompt: Callable[[dict[str, Any], str, list[str]], str],
              choice_text: Callable[[int, str], str], tag_field: str | None = None) -> list[MCQ]:
    """WMDP-style MCQs from records read from ``where``; ``prompt(record, question, choices)`` and
    ``choice_text`` render them the way the benchmark's own evaluation does (the scorer compares the
    log-likelihoods of the rendered choices after the prompt)."""
    out = []
    for index, record in enumerate(records):
        question, choices, answer, tag = mcq_from_record(record, f"{where}: record {index + 1}", tag_field)
        out.append(MCQ(prompt=prompt(record, question, choices),
                       choices=[choice_text(i, c) for i, c in enumerate(choices)],
                       answer_index=answer, tag=tag, question=question, options=list(choices)))
    return out


def read_mcqs(path: Path, prompt: Callable[[str, list[str]], str], choice_text: Callable[[int, str], str],
              tag_field: str | None = None) -> list[MCQ]:
    """`mcqs_from` over the records of a local file."""
    return mcqs_from(read_records(path), str(path), lambda _r, q, c: prompt(q, c), choice_text, tag_field)


def string_field(record: Any, where: str, field: str) -> str:
    """``record[field]``, which must be a non-empty string; otherwise a one-line error naming ``where``."""
    if not isinstance(record, dict) or field not in record:
        raise UserError(f"{where}: missing field '{field}'")
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: field '{field}' must be a non-empty string")
    return value


def read_texts(path: Path, field: str = "text") -> list[str]:
    """A text corpus: records with a non-empty string ``field`` (a forget corpus of ``{text}`` lines)."""
    return [string_field(record, f"{path}: record {index + 1}", field)
            for index, record in enumerate(read_records(path))]


def chunk_texts(texts: list[str], words: int) -> list[str]:
    """Training passages: each text cut into pieces of at most ``words`` whitespace-separated words
    (documents are never joined, so a passage never spans two of them)."""
    if isinstance(words, bool) or not isinstance(words, int) or words < 1:
        raise UserError(f"chunk size must be an integer >= 1 (words), got {shown(words)}")
    out = []
    for text in texts:
        tokens = text.split()
        out.extend(" ".join(tokens[i:i + words]) for i in range(0, len(tokens), words))
    return out
