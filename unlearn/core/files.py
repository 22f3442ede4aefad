"""Reading and writing single files safely: UTF-8 text with one-line errors, atomic writes that replace (never
follow) a symlink planted where the file goes, and a check that a folder really takes files."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import yaml

from unlearn.core.errors import UserError

# Deepest nesting accepted in a JSON or YAML input: every file of this toolkit nests a few levels; a file nested
# 100,000 deep (200 KB) would otherwise exhaust the stack of the parser or of whatever walks the result.
MAX_DEPTH = 64


def nesting_depth(data: Any, limit: int = MAX_DEPTH) -> int:
    """How deep `data` nests (lists and mappings), counted without recursion; stops counting past `limit`."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, list | tuple):
            children = list(node)
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((c, depth + 1) for c in children)
    return deepest


def check_depth(data: Any, where: str) -> Any:
    if nesting_depth(data) > MAX_DEPTH:
        raise UserError(f"{where} nests deeper than {MAX_DEPTH} levels")
    return data


def loads_json(text: str, where: str) -> Any:
    """json.loads, with nesting bounded: a one-line UserError instead of a RecursionError (malformed JSON still
    raises json.JSONDecodeError, for the caller's own message)."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise UserError(f"{where} nests deeper than {MAX_DEPTH} levels") from None
    return check_depth(data, where)


def writable_dir(path: Path, what: str) -> Path:
    """Create `path` if needed and prove it takes files (a probe file, since root passes every access check)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{what} {path} is not writable ({err.strerror or type(err).__name__})") from None
    return path


def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file's contents; one-line UserError for a missing, unreadable or non-UTF-8 file, or for
    something that is not a regular file (a FIFO would block the read forever)."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise UserError(f"{what} {path} is not a regular file")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                        f"{err.start})") from None
    except OSError as err:
        raise UserError(f"cannot read {what} {path} ({err.strerror or type(err).__name__})") from None


def write_atomic(path: Path, write: Any) -> None:
    """`write(tmp_path)` then rename over `path`: readers never see half a file, and a symlink planted at
    `path` (in a received folder) is replaced, not followed to overwrite whatever it points at."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line (per-item samples), written atomically like every other result file."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


def write_yaml(path: Path, data: Any) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def read_json(path: Path) -> dict[str, Any]:
    text = read_text(path)
    try:
        data = loads_json(text, str(path))
    except json.JSONDecodeError as err:
        raise UserError(f"malformed JSON in {path} (line {err.lineno}): {err.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
