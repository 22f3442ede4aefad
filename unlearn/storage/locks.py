"""`flock` locks on files, released by the kernel when their holder dies (even by `kill -9`), so a lock that can be
taken belongs to nobody alive. Writers hold a lock exclusively; commands that read a run and add to it (eval,
attack, report) hold it shared, so a run cannot be replaced under them.

A lock file is never another file in disguise: it is opened without following a symlink, and refused when it is
not a regular file or has a second hard link (truncating it would overwrite the file it is linked to). What it
holds starts with `LOCK_MARK`, so a clean-up removes only lock files this toolkit provably made."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from unlearn.core.errors import UserError

LOCK_MARK = "unlearn-lock"


class Busy(UserError):
    """Another live process holds the lock (a one-line user error; callers that can go on without it catch it)."""


class FileLock:
    """An exclusive `flock` on one file, held until released or until the process dies."""

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path, self.create, self.fd, self.shared = path, create, -1, False

    def _open(self) -> int | None:
        """The lock file's descriptor; never through a symlink (a received folder may plant one to make us
        truncate another file), only a regular file, and only one with no other hard link."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if self.create else 0)
        for _ in range(5):
            try:
                fd = os.open(self.path, flags, 0o644)
            except FileNotFoundError:
                if not self.create:
                    return None
                self.path.parent.mkdir(parents=True, exist_ok=True)  # removed by a run that created it
                continue
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise UserError(f"{self.path} is a symbolic link; remove it (lock files are never followed)") \
                        from None
                raise
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                os.close(fd)
                raise UserError(f"{self.path} is not a regular file; remove it")
            if info.st_nlink == 0:  # its holder removed it between our open and our look: open the new one
                os.close(fd)
                continue
            if info.st_nlink > 1:  # a hard link planted at the lock path: writing our pid would overwrite its target
                os.close(fd)
                raise UserError(f"{self.path} has {info.st_nlink} hard links, so it is another file too; remove it "
                                "(lock files are never written through a link)")
            return fd
        raise UserError(f"cannot create the lock file {self.path}")

    def acquire(self, wait: bool = False, shared: bool = False) -> bool:
        """Take the lock (`shared`: alongside other shared holders, never beside an exclusive one)."""
        busy_tries = 0
        self.shared = shared
        while True:
            fd = self._open()
            if fd is None:
                return False
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                # Held with no pid in it: a cleaner probing a dead writer's lock, or an owner a moment before
                # it writes its pid. Either lets go within milliseconds.
                if self.create and not self._pid() and busy_tries < 20:
                    busy_tries += 1
                    time.sleep(0.05)
                    continue
                return False
            # The previous holder may have unlinked the file between our open and our flock: then the lock we
            # hold is on a file nobody else will ever open, and we must start over on the current one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same or not self.create:
                self.fd = fd
                if shared and self.create and os.fstat(fd).st_size == 0:
                    os.pwrite(fd, f"{LOCK_MARK} shared\n".encode(), 0)  # every reader writes the same bytes
                return True
            os.close(fd)

    def _text(self) -> str:
        try:
            return self.path.read_bytes()[:64].decode("ascii", "replace").strip()
        except OSError:
            return ""

    def _pid(self) -> str:
        text = self._text().removeprefix(LOCK_MARK).strip()
        return text if text.isdigit() else ""

    def marked(self) -> bool:
        """The file says it is one of ours (a user's `.notes.lock` does not)."""
        return self._text().startswith(LOCK_MARK)

    def holder(self) -> str:
        pid = self._pid()
        return f"pid {pid}" if pid else "pid unknown"

    def read_by_others(self) -> bool:
        """Held shared (eval, attack, report), not by a writer."""
        return self._text() == f"{LOCK_MARK} shared"

    def write_owner(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{LOCK_MARK} {os.getpid()}\n".encode(), 0)

    def release(self, unlink: bool) -> None:
        if self.fd < 0:
            return
        if unlink and self.shared:
            # Other readers may hold it still: only the last one (who can take it exclusively) removes it.
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                unlink = False
        if unlink:  # before closing: whoever opens it later sees it gone and retries on a fresh file
            with suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = -1


def lock_path(final: Path) -> Path:
    """The lock file that guards writing `final`: a hidden sibling."""
    return final.parent / f".{final.name}.lock"


def busy(final: Path, lock: FileLock) -> Busy:
    if lock.read_by_others():
        return Busy(f"{final} is being read by another process (an eval, attack or report of it); wait for it to "
                    "finish or choose another name")
    return Busy(f"{final} is being written by another process ({lock.holder()}); wait for it to finish "
                "or choose another name")


@contextmanager
def claim(final: Path, wait: bool = False) -> Iterator[None]:
    """The right to write `final`, exclusive among processes, for the duration of the block."""
    lock = FileLock(lock_path(final))
    if not lock.acquire(wait=wait):
        raise busy(final, lock)
    lock.write_owner()
    try:
        yield
    finally:
        lock.release(unlink=True)


@contextmanager
def hold(final: Path, what: str = "run") -> Iterator[None]:
    """Hold `final` shared for the block: no writer may replace it meanwhile, and none is doing so now. Where the
    lock file cannot be made (a read-only folder), no writer can make it either, so the folder cannot change."""
    lock = FileLock(lock_path(final))
    try:
        taken = lock.acquire(shared=True)
    except PermissionError:
        yield
        return
    except OSError as err:
        if err.errno != errno.EROFS:
            raise
        yield
        return
    if not taken:
        raise Busy(f"{what} {final} is being written by another process ({lock.holder()}); wait for it to "
                        "finish")
    try:
        yield
    finally:
        lock.release(unlink=True)
