"""Example files in the real benchmarks' formats, written from the embedded world.

`unlearn example-data DIR` writes a WMDP-style question file (plus an MMLU-style utility file and
{text} forget/retain corpora), a MUSE-layout folder and a TOFU-layout folder, all about the embedded benchmark's
fictional entities. They let every `--benchmark wmdp|muse|tofu|openqa` command run offline, and they are
meaningful on the embedded *target* model, which knows the forget and retain facts (its path is printed by
`unlearn prepare`). The tests build their fixtures with the same writers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unlearn.benchmarks.synthetic import Fact, SyntheticSettings, World, generate
from unlearn.benchmarks.tofu.example import write_tofu
from unlearn.storage.runs import staged_dir


def mcq_record(fact: Fact, tag_field: str = "concept") -> dict[str, Any]:
    return {"question": fact.question, "choices": list(fact.choices), "answer": fact.answer_index,
            tag_field: fact.attribute}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_wmdp(folder: Path, bench: World) -> dict[str, Path]:
    """questions.jsonl (forget facts, WMDP format, tagged by concept), mmlu.jsonl (retain facts, MMLU format:
    the utility set), forget_corpus.jsonl and retain_corpus.jsonl ({text} passages)."""
    files = {"questions": folder / "questions.jsonl", "utility": folder / "mmlu.jsonl",
             "forget_corpus": folder / "forget_corpus.jsonl", "retain_corpus": folder / "retain_corpus.jsonl"}
    write_jsonl(files["questions"], [mcq_record(f) for f in bench.facts["forget"]])
    write_jsonl(files["utility"], [mcq_record(f, "subject") for f in bench.facts["retain"]])
    write_jsonl(files["forget_corpus"], [{"text": t} for t in bench.passages["forget"]])
    write_jsonl(files["retain_corpus"], [{"text": t} for t in bench.passages["retain"]])
    return files


def _qa(facts: list[Fact]) -> list[dict[str, str]]:
    return [{"question": f.question, "answer": f.answer} for f in facts]


def _halves(text: str) -> dict[str, str]:
    words = text.split()
    cut = max(1, len(words) // 2)
    return {"prompt": " ".join(words[:cut]), "gt": " ".join(words[cut:])}


def _parts(items: list[str], n: int) -> list[list[str]]:
    size = max(1, len(items) // n)
    return [items[i * size:(i + 1) * size] for i in range(n) if items[i * size:(i + 1) * size]]


def write_muse(folder: Path, bench: World) -> Path:
    """MUSE layout: raw/ text, knowmem/ QA (holdout facts as the few-shot examples), verbmem/ passage halves,
    privleak/ forget vs holdout passages, scal/ growing and sust/ consecutive slices of the forget passages."""
    from unlearn.benchmarks.muse import write_muse_layout

    forget, retain, holdout = (bench.passages[s] for s in ("forget", "retain", "holdout"))
    sust = {f"forget_{i + 1}": part for i, part in enumerate(_parts(forget, 4))}
    scal = {f"forget_{i + 1}": forget[: max(1, len(forget) * (i + 1) // 4)] for i in range(4)}
    write_muse_layout(
        folder, raw={"forget": forget, "retain1": retain, "retain2": retain[::-1], "holdout": holdout},
        forget_qa=_qa(bench.facts["forget"]), retain_qa=_qa(bench.facts["retain"]),
        forget_qa_icl=_qa(bench.facts["holdout"][:3]), retain_qa_icl=_qa(bench.facts["holdout"][3:6]),
        verbmem=[_halves(t) for t in forget], privleak={"forget": forget, "retain": retain, "holdout": holdout},
        scal=scal, sust=sust)
    return folder


def write_example_data(folder: Path, settings: SyntheticSettings | None = None,
                       overwrite: bool = False) -> dict[str, Path]:
    """The three layouts under `folder` (wmdp/, muse/, tofu/), staged and renamed into place; the default settings
    are the default embedded benchmark's, whose target model knows these facts."""
    bench = generate(settings or SyntheticSettings())
    with staged_dir(folder, overwrite=overwrite, kind="example-data") as stage:
        write_wmdp(stage / "wmdp", bench)
        write_muse(stage / "muse", bench)
        write_tofu(stage / "tofu", bench)
    return {"wmdp": folder / "wmdp", "muse": folder / "muse", "tofu": folder / "tofu"}
