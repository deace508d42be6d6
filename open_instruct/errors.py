"""The one exception type for bad user input (flags, files, rows): reported as one ``error:`` line, exit code 2."""


class UserError(Exception):
    """A problem with the user's input (flags, files, rows): reported as one line and a non-zero exit."""
