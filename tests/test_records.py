"""Local benchmark files: every format reads the same records; every malformed file is one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unlearn.benchmarks.datafiles import read_mcqs, read_records, read_texts
from unlearn.core.errors import UserError

RECORDS = [{"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "math"},
           {"question": "Which is a gas?", "choices": ["iron", "neon"], "answer": 1, "subject": "chem"}]


def write(path: Path, records: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_every_format_reads_the_same_mcqs(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"wmdp{suffix}", RECORDS)
    mcqs = read_mcqs(path, prompt=lambda q, cs: q, choice_text=lambda i, c: f" {c}", tag_field="subject")
    assert [(m.prompt, m.choices, m.answer_index, m.tag) for m in mcqs] == [
        ("What is 2 + 2?", [" 3", " 4", " 5", " 22"], 1, "math"), ("Which is a gas?", [" iron", " neon"], 1, "chem")]


@pytest.mark.parametrize(("record", "message"), [
    ({"choices": ["a", "b"], "answer": 0}, "record 2: missing field 'question'"),
    ({"question": "q", "choices": "ab", "answer": 0}, "record 2: field 'choices' must be a list"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "record 2: field 'answer' must be an integer index"),
    ({"question": "q", "choices": ["a", "b"], "answer": "A"}, "field 'answer' must be an integer index"),
    ({"question": "", "choices": ["a", "b"], "answer": 0}, "field 'question' must be a non-empty string"),
])
def test_malformed_mcq_names_file_record_and_field(tmp_path: Path, record: dict, message: str) -> None:
    path = write(tmp_path / "bad.jsonl", [RECORDS[0], record])
    with pytest.raises(UserError) as err:
        read_mcqs(path, prompt=lambda q, cs: q, choice_text=lambda i, c: c)
    assert str(err.value).startswith(str(path)) and message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_files(tmp_path: Path) -> None:
    cases = {"missing.jsonl": "file not found", "data.csv": "unsupported file type '.csv'",
             "broken.jsonl": "line 2 is not valid JSON", "object.json": "expected a JSON list",
             "empty.jsonl": "no records", "damaged.parquet": "not a readable parquet file"}
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "object.json").write_text('{"question": "q"}')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "damaged.parquet").write_bytes(b"PAR1 not really")
    for name, message in cases.items():
        with pytest.raises(UserError, match=message):
            read_records(tmp_path / name)


def test_text_corpus(tmp_path: Path) -> None:
    path = write(tmp_path / "forget.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    assert read_texts(path) == ["alpha", "beta"]
    with pytest.raises(UserError, match="record 2: field 'text' must be a non-empty string"):
        read_texts(write(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": 3}]))
