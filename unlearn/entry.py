"""The `unlearn` command's first instructions (`python -m unlearn` too): Ctrl-C and SIGTERM end in one line and
130 / 143 from here on, even while the heavy libraries (typer, rich, numpy, torch) are still being imported.

An interrupt that lands inside an import used to surface as whatever that half-imported library raised next (a
RecursionError from numpy was seen). This module installs the handlers (unlearn/core/interrupts.py, which imports
nothing heavy) and only then imports the CLI."""

from __future__ import annotations

from unlearn.core.interrupts import Interrupted, exit_interrupted, install_handlers


def main() -> None:
    install_handlers()
    try:
        from unlearn.cli import main as cli_main
    except Interrupted as err:
        exit_interrupted(err)
    cli_main()


if __name__ == "__main__":
    main()
