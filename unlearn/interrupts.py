"""SIGINT and SIGTERM as errors: `Interrupted` raised in the main thread, then one line and exit 130 / 143.
Imports nothing heavy, so the `unlearn` command (unlearn/entry.py) can install the handlers first of all."""

from __future__ import annotations

import signal
import sys


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM. A BaseException of our own, not KeyboardInterrupt: typer
    turns KeyboardInterrupt into a silent return (exit 0), and library code that catches Exception must not
    swallow it. Unwinding runs every `finally`, so staging folders and locks are removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


SIGNAL_EXITS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


def _raise_interrupted(signum: int, _frame: object) -> None:
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
