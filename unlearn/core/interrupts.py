"""SIGINT and SIGTERM as errors: `Interrupted` raised in the main thread, then one line and exit 130 / 143.
Imports nothing heavy, so the `unlearn` command (unlearn/entry.py) can install the handlers first of all."""

from __future__ import annotations

import os
import signal
import sys
import threading
import types


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM. A BaseException of our own, not KeyboardInterrupt: typer
    turns KeyboardInterrupt into a silent return (exit 0), and library code that catches Exception must not
    swallow it. Unwinding runs every `finally`, so staging folders and locks are removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


SIGNAL_EXITS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


# An exception raised while a module is being imported can land inside native code that called back into Python
# (torch's import, via pybind11), which then aborts the process ("terminate called after throwing ...", exit -6),
# or leave a library half-imported. So a signal that arrives during an import is delivered again shortly after,
# until it lands outside every import, where raising is safe.
_IMPORT_FRAMES = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")
_REDELIVER_S = 0.05
_redelivering: set[int] = set()  # signals that arrived during an import and are yet to be raised
_timer: list[threading.Timer] = []


def _inside_import(frame: types.FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename in _IMPORT_FRAMES:
            return True
        frame = frame.f_back
    return False


def _redeliver(signum: int) -> None:
    if signum in _redelivering:
        os.kill(os.getpid(), signum)


def _raise_interrupted(signum: int, frame: types.FrameType | None) -> None:
    if _inside_import(frame):
        _redelivering.add(signum)
        if not (_timer and _timer[0].is_alive()):
            timer = threading.Timer(_REDELIVER_S, _redeliver, (signum,))
            timer.daemon = True
            _timer[:] = [timer]
            timer.start()
        return
    _redelivering.clear()
    raise Interrupted(signum)


def raise_pending() -> None:
    """Raise the interrupt that arrived during an import and has not been delivered yet (a command that finished
    within the redelivery delay must still end as interrupted, never as a success)."""
    if _redelivering:
        signum = min(_redelivering)
        _redelivering.clear()
        raise Interrupted(signum)


def install_handlers() -> None:
    for signum in SIGNAL_EXITS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # a job started to ignore Ctrl-C keeps ignoring it
            signal.signal(signum, _raise_interrupted)


def exit_interrupted(err: Interrupted) -> None:
    for signum in SIGNAL_EXITS:  # a second Ctrl-C while reporting the first must not print a traceback
        signal.signal(signum, signal.SIG_IGN)
    word, code = SIGNAL_EXITS[signal.Signals(err.signum)]
    print(f"error: {word}", file=sys.stderr)
    sys.exit(code)
