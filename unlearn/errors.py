"""One exception type for everything the user can fix; the CLI turns it into one line and exit 2."""


class UserError(Exception):
    """Bad input or a condition the user must act on (not a bug in the toolkit)."""
