"""Exclusive `flock` locks on files, released by the kernel when their holder dies (even by `kill -9`), so a
lock that can be taken belongs to nobody alive."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from unlearn.errors import UserError


class FileLock:
    """An exclusive `flock` on one file, held until released or until the process dies."""

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path, self.create, self.fd = path, create, -1

    def _open(self) -> int | None:
        """The lock file's descriptor; never through a symlink (a received folder may plant one to make us
        truncate another file) and only a regular file."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if self.create else 0)
        for _ in range(3):
            try:
                fd = os.open(self.path, flags, 0o644)
                break
            except FileNotFoundError:
                if not self.create:
                    return None
                self.path.parent.mkdir(parents=True, exist_ok=True)  # removed by a run that created it
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise UserError(f"{self.path} is a symbolic link; remove it (lock files are never followed)") \
                        from None
                raise
        else:
            raise UserError(f"cannot create the lock file {self.path}")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"{self.path} is not a regular file; remove it")
        return fd

    def acquire(self, wait: bool = False) -> bool:
        busy_tries = 0
        while True:
            fd = self._open()
            if fd is None:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
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
                return True
            os.close(fd)

    def _pid(self) -> str:
        try:
            text = self.path.read_bytes()[:32].decode("ascii", "replace").strip()
        except OSError:
            return ""
        return text if text.isdigit() else ""

    def holder(self) -> str:
        return self._pid() or "unknown"

    def write_owner(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self, unlink: bool) -> None:
        if self.fd < 0:
            return
        if unlink:  # before closing: whoever opens it later sees it gone and retries on a fresh file
            with suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = -1


def lock_path(final: Path) -> Path:
    """The lock file that guards writing `final`: a hidden sibling."""
    return final.parent / f".{final.name}.lock"


def busy(final: Path, lock: FileLock) -> UserError:
    return UserError(f"{final} is being written by another process (pid {lock.holder()}); wait for it to finish "
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
