"""Run folders written atomically: everything goes into a hidden staging folder next to the
final one and is renamed into place only when complete, so a crash or an error never leaves a
folder that looks like a finished run."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from unlearn.errors import UserError


def free_run_dir(output_dir: Path, name: str, overwrite: bool = False) -> Path:
    """`name`, or `name-2`, `name-3`, ... if taken (unless overwriting)."""
    candidate = output_dir / name
    if overwrite or not candidate.exists():
        return candidate
    n = 2
    while (output_dir / f"{name}-{n}").exists():
        n += 1
    return output_dir / f"{name}-{n}"


@contextmanager
def staged_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    if final.exists() and not overwrite:
        raise UserError(f"{final} already exists")
    staging = final.parent / f".staging-{final.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_yaml(path: Path, data: Any) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise UserError(f"malformed JSON in {path} (line {err.lineno}): {err.msg}") from None
