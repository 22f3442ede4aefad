"""One exception type for everything the user can fix; the CLI turns it into one line and exit 2."""

from __future__ import annotations

import reprlib
from typing import Any

SHOWN_CHARACTERS = 200  # of a value quoted in an error message: enough to recognise it, never a flood


class UserError(Exception):
    """Bad input or a condition the user must act on (not a bug in the toolkit)."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = SHOWN_CHARACTERS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 4


def shown(value: Any) -> str:
    """`repr(value)` for an error message, at most about SHOWN_CHARACTERS long (built without ever forming the
    whole repr of a huge or deeply nested value)."""
    text = _REPR.repr(value)
    return text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS] + "..."


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to many lines), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
