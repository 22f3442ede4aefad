"""Folders the toolkit writes (runs, attack results, cached targets, example data), safely.

- **Atomic.** Everything goes into a hidden staging folder beside the final one and is renamed into place only
  when complete, so a crash, an error or an interrupt never leaves a folder that looks like a finished one.
- **Marked.** Every folder written here holds a `.unlearn` marker. `--overwrite` replaces only folders that
  have it (or, for folders written before the marker existed, only the files this toolkit writes), never an
  arbitrary folder a name or a received config happens to point at.
- **One writer.** A lock file beside the final folder (`.NAME.lock`, `flock`) is held for the whole write: a
  second process on the same name is refused instead of silently losing one of the two results.
- **Self-cleaning.** The marker inside a staging folder is locked by its writer while it writes; the kernel
  drops that lock when the writer dies, even by `kill -9`, so the next write into the same parent folder can
  tell a dead writer's staging folder from a live one and removes it (and says so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

from unlearn.core.errors import UserError, shown
from unlearn.core.files import writable_dir
from unlearn.storage.locks import FileLock, busy, claim, lock_path

MARKER = ".unlearn"
STAGING_PREFIX = ".staging-"
# A resumable run's staging folder (train.save_every > 0): it keeps its checkpoints when the run is interrupted
# or killed, for `unlearn run --resume NAME`; only that command or `--overwrite` of NAME removes it.
PARTIAL_PREFIX = ".partial-"
CHECKPOINTS = "checkpoints"  # inside it, unlearn.storage.checkpoints writes these (complete ones only: step-N, stage-K)
CHECKPOINT_PREFIXES = ("step-", "stage-")
TRASH_PREFIX = ".trash-"
# What toolkit folders held before the marker existed: such a folder may still be replaced by --overwrite.
LEGACY_ENTRIES = {"config.yaml", "metrics.json", "log.jsonl", "model", "attacks", "prepare.json"}
# A staging folder without a marker is being created right now, unless it is older than this.
_UNMARKED_GRACE_S = 60.0
MAX_NAME_LENGTH = 200


def print_note(text: str) -> None:
    print(f"note: {text}", flush=True)


def check_name(name: Any, what: str = "run name") -> str:
    """`name` if it names one folder inside its parent; a one-line UserError otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{what} must be a non-empty string, got {shown(name)}")
    bad = [c for c in name if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise UserError(f"{what} {shown(name)} contains a control character ({shown(bad[0])})")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} {shown(name)} is not valid Unicode text") from None
    if name in (".", "..") or "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        raise UserError(f"{what} {shown(name)} must be a plain folder name (no '/', '\\', '.' or '..')")
    if name.startswith("."):
        raise UserError(f"{what} {shown(name)} must not start with '.' (hidden names are the toolkit's own)")
    if len(name.encode("utf-8")) > MAX_NAME_LENGTH:
        raise UserError(f"{what} is {len(name.encode('utf-8'))} bytes long (UTF-8); at most {MAX_NAME_LENGTH}")
    return name


def child(parent: Path, name: str, what: str = "run name") -> Path:
    """parent/name, checked to be a direct child of parent once both are resolved (no escape via links)."""
    path = parent / check_name(name, what)
    if path.resolve().parent != parent.resolve():
        raise UserError(f"{what} {shown(name)} resolves outside {parent}")
    return path


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with suppress(OSError):
                total += (Path(root) / f).lstat().st_size
    return total


def _staging_state(staging: Path) -> str:
    """"stale" (its writer is gone), "live", "young" (being created: no marker yet) or "foreign" (no marker and
    old: nothing says this toolkit made it, so it is not ours to delete)."""
    marker = staging / MARKER
    if marker.is_symlink() or not marker.is_file():
        return "young" if not _older_than_grace(staging) else "foreign"
    try:
        lock = FileLock(marker, create=False)
        if not lock.acquire():
            return "live"
    except UserError:
        return "foreign"  # a marker that is a link is not one we wrote
    lock.release(unlink=False)
    return "stale"


_LEFTOVER = re.compile(r"^\.(staging|trash)-(.+)-[0-9a-f]{8}$")
_LOCK_FILE = re.compile(r"^\.(.+)\.lock$")
_NOT_OURS = "has no toolkit marker, so it may be yours: left as it is"


def clean_stale(parent: Path) -> list[str]:
    """Tidy what dead writers left in `parent`, one note each: their staging folders are removed, an old folder
    moved aside for a replacement that never arrived is put back, and old unheld lock files go. Only what provably
    came from this toolkit is touched (a name this module makes *and* its marker): `parent` may be any folder a
    config names, and a user's `.notes.lock` or `.staging-thesis-0badcafe/` is left, with a note."""
    notes: list[str] = []
    if not parent.is_dir():
        return notes
    for entry in sorted(parent.iterdir()):
        leftover, lock_file = _LEFTOVER.match(entry.name), _LOCK_FILE.match(entry.name)
        if leftover and entry.is_dir() and not entry.is_symlink():
            kind, name = leftover.groups()
            if kind == "trash":
                if not replaceable(entry):
                    notes.append(f"{entry} {_NOT_OURS}")
                    continue
                home = parent / name
                if not (home.exists() or home.is_symlink()):
                    owner = FileLock(lock_path(home))
                    if owner.acquire():  # nobody is in the middle of replacing it
                        with suppress(OSError):
                            entry.rename(home)
                            notes.append(f"restored {home} (its replacement was interrupted before it was in place)")
                        owner.release(unlink=True)
                    continue
            else:
                state = _staging_state(entry)
                if state == "foreign":
                    notes.append(f"{entry} {_NOT_OURS}")
                if state != "stale":
                    continue
            size = _size(entry)
            shutil.rmtree(entry, ignore_errors=True)
            notes.append(f"removed {entry} ({size / 2**20:.1f} MiB), left by a writer that was interrupted or killed")
        elif lock_file and not entry.is_symlink() and entry.is_file() and _older_than_grace(entry):
            note = _remove_dead_lock(entry)
            if note:
                notes.append(note)
    return notes


def _remove_dead_lock(path: Path) -> str:
    """Remove a killed writer's lock file; "" when done or when it is held, a note when it is not ours."""
    lock = FileLock(path, create=False)
    try:
        if not lock.marked():
            return f"{path} {_NOT_OURS}"
        if lock.acquire():  # nobody holds it: a killed writer's; removing it under the lock is race-free
            lock.release(unlink=True)
    except UserError:
        return f"{path} {_NOT_OURS}"  # a link, not a lock file we made
    return ""


def _older_than_grace(path: Path) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > _UNMARKED_GRACE_S
    except FileNotFoundError:
        return False


def replaceable(folder: Path) -> bool:
    """True if `folder` is one this toolkit wrote (so `--overwrite` may replace it)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    entries = {p.name for p in folder.iterdir()}
    if MARKER in entries:
        return True
    legacy = {e for e in entries if not (e.startswith("log-") and e.endswith(".jsonl"))}
    return bool(entries & {"metrics.json", "prepare.json"}) and legacy <= LEGACY_ENTRIES


def _refuse_replacing(final: Path) -> None:
    if not replaceable(final):
        raise UserError(f"{final} exists and was not written by this toolkit; --overwrite only replaces its own "
                        "folders (run folders, attack results): choose another name or remove it yourself")


@contextmanager
def open_run_dir(output_dir: Path, name: str, overwrite: bool = False,
                 resume: bool = False) -> Iterator[tuple[Path, list[str]]]:
    """Claim the run folder `output_dir/name` for the whole run: (final path, notes for the user).

    Without `overwrite`, a name that exists or is being written is taken, and the first free `name-N` is used
    instead (a note says so). With `overwrite`, the folder must be a toolkit folder and nobody may be writing it.
    `resume`: exactly `name`, which must not be finished and must have an interrupted run's partial folder.
    """
    check_name(name)
    if resume:
        final = child(output_dir, name)
        if _taken(final):
            raise UserError(f"{final} is a finished run: there is nothing to resume")
        if not partial_dir(final).is_dir():
            raise UserError(f"nothing to resume: no interrupted run {shown(name)} under {output_dir} "
                            f"(a run leaves one when train.save_every > 0)")
        with claim(final):
            yield final, []
        return
    created = not output_dir.exists()
    writable_dir(output_dir, "output folder")
    try:
        with _free_name(output_dir, name, overwrite) as claimed:
            yield claimed
    finally:
        if created:  # a run that failed before writing anything leaves no trace, not even an empty folder
            with suppress(OSError):
                output_dir.rmdir()


@contextmanager
def _free_name(output_dir: Path, name: str, overwrite: bool) -> Iterator[tuple[Path, list[str]]]:
    notes = clean_stale(output_dir)
    candidates = [name] if overwrite else [name] + [f"{name}-{n}" for n in range(2, 10_000)]
    for candidate in candidates:
        if not overwrite and (_taken(output_dir / candidate) or partial_dir(output_dir / candidate).exists()):
            if partial_dir(output_dir / candidate).exists() and not _taken(output_dir / candidate):
                notes.append(f"{partial_dir(output_dir / candidate)} holds an interrupted run: "
                             f"`unlearn run --resume {candidate}` continues it, --overwrite starts it over")
            continue
        final = child(output_dir, candidate)
        lock = FileLock(lock_path(final))
        if not lock.acquire():
            if overwrite:
                raise busy(final, lock)
            continue
        lock.write_owner()
        try:
            if overwrite and (final.exists() or final.is_symlink()):
                _refuse_replacing(final)
            elif final.exists():  # created between our check and our lock
                continue
            if candidate != name:
                notes.append(f"{output_dir / name} exists; writing {final} instead (--overwrite replaces it)")
            yield final, notes
            return
        finally:
            lock.release(unlink=True)
    raise UserError(f"no free run name like {name}-N under {output_dir}")


def _taken(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def partial_dir(final: Path) -> Path:
    return final.parent / f"{PARTIAL_PREFIX}{final.name}"


def _has_checkpoint(staging: Path) -> bool:
    folder = staging / CHECKPOINTS
    return folder.is_dir() and any(p.name.startswith(CHECKPOINT_PREFIXES) for p in folder.iterdir())


@contextmanager
def staged_dir(final: Path, overwrite: bool = False, claimed: bool = False, kind: str = "run",
               resumable: bool = False, resume: bool = False,
               log: Callable[[str], None] = print_note) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `final` atomically. `claimed`: the caller already holds
    `final`'s lock (open_run_dir). What the clean-up of `final`'s parent did or left goes to `log`.
    `resumable`: stage in `.partial-NAME`, kept with its checkpoints when the
    write fails or is interrupted (and removed without them); `resume`: continue in the one a killed or
    interrupted run left (the caller holds `final`'s lock, so its writer is gone)."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with nullcontext() if claimed else claim(final):
        for note in clean_stale(parent):
            log(note)
        if final.exists() or final.is_symlink():
            if not overwrite:
                raise UserError(f"{final} already exists")
            _refuse_replacing(final)
        if overwrite and not resume and _taken(partial_dir(final)):
            partial = partial_dir(final)
            if partial.is_symlink() or not (partial.is_dir() and ((partial / MARKER).is_file()
                                                                  or (partial / CHECKPOINTS).is_dir())):
                raise UserError(f"{partial} {_NOT_OURS}; remove it yourself to reuse the name {shown(final.name)}")
            shutil.rmtree(partial)  # --overwrite of an interrupted run: start it over
        if resumable:
            staging = partial_dir(final)
            if resume and not staging.is_dir():
                raise UserError(f"nothing to resume: {staging} does not exist")
            staging.mkdir(exist_ok=resume)
            (staging / MARKER).unlink(missing_ok=True)  # re-made (and locked) below
        else:
            staging = parent / f"{STAGING_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
        # The marker is locked before it gets its name: a cleaner that finds `.unlearn` in a staging folder and
        # can lock it knows the writer is gone (the grace period covers the moment before it is named).
        owner = FileLock(staging / f"{MARKER}.new")
        try:
            if not owner.acquire(wait=True):
                raise UserError(f"cannot lock {owner.path}")
            os.pwrite(owner.fd, json.dumps({"toolkit": "unlearn", "kind": kind}).encode() + b"\n", 0)
            os.rename(owner.path, staging / MARKER)
            yield staging
            shutil.rmtree(staging / CHECKPOINTS, ignore_errors=True)  # a finished run does not ship them
            _swap_into_place(staging, final)
        finally:
            owner.release(unlink=False)
            if staging.exists() and not (resumable and _has_checkpoint(staging)):
                shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(staging: Path, final: Path) -> None:
    """Two renames, with SIGINT/SIGTERM held back between them: the old folder is moved aside (a `.trash-`
    sibling) only to be deleted once the new one is in place. A kill -9 between the two leaves the trash,
    which the next `clean_stale` puts back where it was."""
    trash = final.parent / f"{TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    held = {signal.SIGINT, signal.SIGTERM}
    blocked = threading.current_thread() is threading.main_thread()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held) if blocked else set()
    try:
        if final.exists() or final.is_symlink():
            final.rename(trash)
        staging.rename(final)
    finally:
        if final.parent.joinpath(trash.name).exists() and not (final.exists() or final.is_symlink()):
            trash.rename(final)  # the new folder did not make it: the old one stays
        if blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    shutil.rmtree(trash, ignore_errors=True)
