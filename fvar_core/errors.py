"""The one exception class for mistakes a user can make (bad input, bad preset, missing file).

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with what the user asked for, explained in one line."""


class FvarWarning(UserWarning):
    """Something a user should know that does not stop the command (a skipped corrupt checkpoint,
    a stale lock taken over). The CLI prints it as one `fvar: warning:` line."""
