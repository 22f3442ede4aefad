"""Where TOFU's sets come from (a folder in TOFU's layout, or the hub) and their record checks, plus the file a
retain model's forget truth ratios can be given in."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn.benchmarks.datafiles import read_records, string_field
from unlearn.benchmarks.tofu.settings import HUB_ALIASES, HUB_REPO, SUFFIXES
from unlearn.core.errors import UserError, shown


@dataclass(frozen=True)
class QA:
    """One TOFU item: a question, its answer, and (perturbed sets) a paraphrase and wrong answers."""

    question: str
    answer: str
    paraphrased: str = ""
    perturbed: tuple[str, ...] = ()


class TofuSource:
    """The sets of one TOFU copy, by split name (forget10, retain90, retain_perturbed, ...); every record read is
    folded into `digest`, so the task's fingerprint changes whenever the data does."""

    def __init__(self, data: Any) -> None:
        if data is None or (isinstance(data, str) and not data.strip()):
            raise UserError("benchmark 'tofu' needs data: pass --data DIR (TOFU layout) or tofu (the hub)")
        if not isinstance(data, str | Path):
            raise UserError(f"benchmark.data must be a folder or a hub name, got {shown(data)}")
        text = str(data)
        self.root = Path(text) if Path(text).is_dir() else None
        if self.root is None and text not in HUB_ALIASES:
            raise UserError(f"{text}: not a directory; pass a folder in TOFU's layout (forget10.json, "
                            f"forget10_perturbed.json, retain90.json, ...) or {' / '.join(HUB_ALIASES)}")
        self.where = text if self.root is not None else HUB_REPO
        self.digest = hashlib.sha256(f"tofu:{'local' if self.root else HUB_REPO}\0".encode())

    def has(self, split: str) -> bool:
        if self.root is not None:
            return self._local(split) is not None
        return split in self._hub_splits

    @functools.cached_property
    def _hub_splits(self) -> frozenset[str]:
        """The hub dataset's configurations, asked once per source (a load asks `has` for several splits)."""
        try:
            import datasets

            return frozenset(datasets.get_dataset_config_names(HUB_REPO))
        except Exception:  # noqa: BLE001 - offline: every split is as good as absent, and read() explains why
            return frozenset()

    def _local(self, split: str) -> Path | None:
        assert self.root is not None
        found = [self.root / f"{split}{s}" for s in SUFFIXES if (self.root / f"{split}{s}").is_file()]
        if len(found) > 1:
            raise UserError(f"{self.root}: both {found[0].name} and {found[1].name} exist; keep one")
        return found[0] if found else None

    def read(self, split: str) -> tuple[str, list[Any]]:
        """(where, records) of one split."""
        if self.root is not None:
            path = self._local(split)
            if path is None:
                raise UserError(f"{self.root / (split + '.json')}: file not found (or .jsonl/.parquet; the TOFU "
                                "layout is described in benchmarks/tofu)")
            where, records = str(path), read_records(path)
        else:
            where, records = f"{HUB_REPO} {split}", self._hub(split)
        self.digest.update(f"{split}\0".encode())
        self.digest.update(json.dumps(records, sort_keys=True, default=str).encode())
        return where, records

    def _hub(self, split: str) -> list[Any]:
        import datasets

        try:
            return datasets.load_dataset(HUB_REPO, split, split="train").to_list()
        except Exception as err:  # noqa: BLE001 - offline, renamed or missing: the user needs the same advice
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UserError(f"cannot load {HUB_REPO} ({split}) from the Hugging Face hub ({type(err).__name__}: "
                            f"{reason}); a local folder in TOFU's layout works offline (--data DIR)") from None


def qa_items(where: str, records: list[Any], correct: str | None = None) -> list[QA]:
    """The records of a QA set, or with `correct` (the field the truth ratio compares: paraphrased_answer or
    answer) of a perturbed set, whose `perturbed_answer` is a non-empty list of strings."""
    out = []
    for index, record in enumerate(records):
        at = f"{where}: record {index + 1}"
        question, answer = string_field(record, at, "question"), string_field(record, at, "answer")
        if correct is None:
            out.append(QA(question, answer))
            continue
        wrong = record.get("perturbed_answer")
        if isinstance(wrong, str):
            wrong = [wrong]
        if not isinstance(wrong, list) or not wrong or not all(isinstance(w, str) and w.strip() for w in wrong):
            raise UserError(f"{at}: field 'perturbed_answer' must be a non-empty list of non-empty strings")
        out.append(QA(question, answer, string_field(record, at, correct), tuple(wrong)))
    return out


def retain_truth_ratios(path: str) -> list[float]:
    """A retain model's forget-set truth ratios R = P(perturbed)/P(correct), from one of: the samples.jsonl of
    `unlearn eval --benchmark tofu --log-samples` (rows of tofu/forget_truth_ratio), OpenUnlearning's TOFU_EVAL.json
    (forget_truth_ratio.value_by_index), or TOFU's eval_log_forget.json (avg_paraphrased_loss and
    average_perturb_loss, whose ratio is exp(paraphrased loss - mean perturbed loss))."""
    file = Path(path)
    records = read_records(file) if file.suffix.lower() == ".jsonl" else None
    if records is not None:
        values = [r.get("truth_ratio") for r in records
                  if isinstance(r, dict) and r.get("metric") == "tofu/forget_truth_ratio"]
    else:
        from unlearn.core.files import loads_json, read_text

        try:
            data = loads_json(read_text(file, "retain statistics file"), str(file))
        except json.JSONDecodeError as err:
            raise UserError(f"{file}: not valid JSON ({err.msg})") from None
        values = _ratios_of(data, file)
    if not values or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                             for v in values):
        raise UserError(f"{file}: no forget truth ratios found (expected the samples.jsonl of `unlearn eval "
                        "--benchmark tofu --log-samples`, OpenUnlearning's TOFU_EVAL.json or TOFU's "
                        "eval_log_forget.json), or a value that is not a non-negative number")
    return [float(v) for v in values]


def _ratios_of(data: Any, file: Path) -> list[Any]:
    if not isinstance(data, dict):
        return []
    section = data.get("forget_truth_ratio")
    if isinstance(section, dict) and isinstance(section.get("value_by_index"), dict):
        rows = section["value_by_index"].values()
        return [row.get("score") if isinstance(row, dict) else None for row in rows]
    paraphrased, perturbed = data.get("avg_paraphrased_loss"), data.get("average_perturb_loss")
    if isinstance(paraphrased, dict) and isinstance(perturbed, dict):
        out: list[Any] = []
        for key, loss in paraphrased.items():
            wrong = perturbed.get(key)
            if not isinstance(loss, int | float) or not isinstance(wrong, list) or not wrong or not all(
                    isinstance(w, int | float) for w in wrong):
                raise UserError(f"{file}: item {key!r} has no usable paraphrased and perturbed losses")
            out.append(math.exp(min(700.0, loss - sum(wrong) / len(wrong))))
        return out
    return []
