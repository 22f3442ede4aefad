"""Write a folder in MUSE's layout (the example data and the tests use it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_txt(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(texts), encoding="utf-8")


def write_muse_layout(folder: Path, *, raw: dict[str, list[str]], forget_qa: list[dict[str, str]],
                      retain_qa: list[dict[str, str]], forget_qa_icl: list[dict[str, str]],
                      retain_qa_icl: list[dict[str, str]], verbmem: list[dict[str, str]],
                      privleak: dict[str, list[str]], scal: dict[str, list[str]] | None = None,
                      sust: dict[str, list[str]] | None = None) -> Path:
    """Write a MUSE-layout folder that `load({"data": folder})` reads: raw/scal/sust splits as .txt (texts
    joined by blank lines), everything else as .json."""
    folder = Path(folder)
    for subset, splits in (("raw", raw), ("scal", scal or {}), ("sust", sust or {})):
        for split, texts in splits.items():
            _write_txt(folder / subset / f"{split}.txt", texts)
    for name, rows in (("forget_qa", forget_qa), ("retain_qa", retain_qa), ("forget_qa_icl", forget_qa_icl),
                       ("retain_qa_icl", retain_qa_icl)):
        _write_json(folder / "knowmem" / f"{name}.json", rows)
    _write_json(folder / "verbmem" / "forget.json", verbmem)
    for split, texts in privleak.items():
        _write_json(folder / "privleak" / f"{split}.json", texts)
    return folder
