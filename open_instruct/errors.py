"""The one exception type for bad user input (flags, files, rows), reported as one ``error:`` line and exit code 2;
and the ``note:`` line for a flag accepted but changed or without effect here."""

import os
import sys


class UserError(Exception):
    """A problem with the user's input (flags, files, rows): reported as one line and a non-zero exit."""


def say_note(line: str) -> None:
    """Print a ``note:`` line (a flag accepted but changed or without effect here) on stderr, from rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
