"""Where MUSE's files come from (a local folder in MUSE's layout, or the hub) and their record checks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

from unlearn.benchmarks.datafiles import read_records, string_field
from unlearn.benchmarks.muse.settings import RECORD_SUFFIXES, STAGE_SPLIT, TEXT_SUFFIXES
from unlearn.core.errors import UserError
from unlearn.core.files import read_text


class Source(Protocol):
    where: str  # the folder or hub repository, for messages

    def records(self, subset: str, split: str, *, text: bool, required: bool) -> tuple[str, list[Any]] | None:
        """(where, records) of one split; None when an optional split is absent."""

    def stage_splits(self) -> list[str]:
        """The sust/forget_<i> split names present, in numeric order."""


class LocalSource:
    def __init__(self, root: Path, digest: Any) -> None:
        self.root, self.digest = root, digest
        self.where = str(root)

    def _find(self, subset: str, split: str, suffixes: tuple[str, ...]) -> Path | None:
        found = [self.root / subset / f"{split}{s}" for s in suffixes if (self.root / subset / f"{split}{s}").is_file()]
        if len(found) > 1:
            raise UserError(f"{self.root / subset}: both {found[0].name} and {found[1].name} exist for split "
                            f"'{split}'; keep one")
        return found[0] if found else None

    def records(self, subset: str, split: str, *, text: bool, required: bool) -> tuple[str, list[Any]] | None:
        path = self._find(subset, split, TEXT_SUFFIXES if text else RECORD_SUFFIXES)
        if path is None:
            if not required:
                return None
            expected = self.root / subset / f"{split}{'.txt' if text else '.json'}"
            others = "/".join(s.lstrip(".") for s in (TEXT_SUFFIXES if text else RECORD_SUFFIXES)[1:])
            raise UserError(f"{expected}: file not found (or .{others}; the MUSE data layout is described in "
                            "benchmarks/muse.py)")
        # The fingerprint covers every file read, by name and content.
        self.digest.update(f"{subset}/{path.name}\0".encode())
        self.digest.update(path.read_bytes())
        if path.suffix.lower() == ".txt":
            content = read_text(path, "MUSE text file")
            if not content.strip():
                raise UserError(f"{path}: no text")
            return str(path), [content]
        return str(path), read_records(path)

    def stage_splits(self) -> list[str]:
        folder = self.root / "sust"
        names = {p.stem for p in folder.glob("forget_*") if p.suffix.lower() in TEXT_SUFFIXES and
                 STAGE_SPLIT.fullmatch(p.stem)} if folder.is_dir() else set()
        return sorted(names, key=lambda n: int(n.split("_")[1]))


class HubSource:
    def __init__(self, repo: str, digest: Any) -> None:
        self.repo, self.digest = repo, digest
        self.where = repo
        self.digest.update(f"hub:{repo}\0".encode())

    def _fail(self, what: str, err: Exception) -> UserError:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return UserError(f"cannot load {self.repo} ({what}) from the Hugging Face hub: the hub could not be reached "
                         f"or the dataset/split is missing ({type(err).__name__}: {reason}); a local directory in "
                         "MUSE layout works offline (--data DIR)")

    def records(self, subset: str, split: str, *, text: bool, required: bool) -> tuple[str, list[Any]] | None:
        import datasets

        try:
            rows = datasets.load_dataset(self.repo, subset, split=split).to_list()
        except Exception as err:  # noqa: BLE001 - offline, renamed or missing: the user needs the same advice
            if not required:
                return None
            raise self._fail(f"{subset}/{split}", err) from None
        self.digest.update(f"{subset}/{split}\0".encode())
        self.digest.update(json.dumps(rows, sort_keys=True, default=str).encode())
        return f"{self.repo} {subset}/{split}", rows

    def stage_splits(self) -> list[str]:
        import datasets

        try:
            names = datasets.get_dataset_split_names(self.repo, "sust")
        except Exception as err:  # noqa: BLE001 - as above
            raise self._fail("sust", err) from None
        return sorted((n for n in names if STAGE_SPLIT.fullmatch(n)), key=lambda n: int(n.split("_")[1]))


def record_texts(where: str, records: list[Any], skipped: list[str] | None = None) -> list[str]:
    """Strings, or {text} records (the hub's form): both are accepted. With `skipped`, empty records are
    left out and counted there (MUSE-News raw/forget.json has some); otherwise an empty one is an error."""
    out, empty = [], 0
    for index, record in enumerate(records):
        value = record.get("text") if isinstance(record, dict) and skipped is not None else record
        if skipped is not None and isinstance(value, str) and not value.strip():
            empty += 1
            continue
        if isinstance(record, str):
            if not record.strip():
                raise UserError(f"{where}: record {index + 1} is an empty string")
            out.append(record)
        else:
            out.append(string_field(record, f"{where}: record {index + 1}", "text"))
    if empty and skipped is not None:
        skipped.append(f"{where}: {empty} empty record(s) of {len(records)} skipped")
    return out


def record_pairs(where: str, records: list[Any], first: str, second: str) -> list[tuple[str, str]]:
    """(record[first], record[second]) of each record: {question, answer} for KnowMem, {prompt, gt} for VerbMem."""
    return [(string_field(r, f"{where}: record {i + 1}", first), string_field(r, f"{where}: record {i + 1}", second))
            for i, r in enumerate(records)]


def split_spec(value: Any, key: str) -> tuple[str, str]:
    parts = str(value).split("/") if isinstance(value, str) else []
    if len(parts) != 2 or not all(re.fullmatch(r"[\w.-]+", p) and p not in (".", "..") for p in parts):
        raise UserError(f"benchmark.{key} must name a text split as SUBSET/SPLIT (e.g. raw/forget, scal/forget_2), "
                        f"got {value!r}")
    return parts[0], parts[1]
