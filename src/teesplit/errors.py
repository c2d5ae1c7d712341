"""Errors that mean "the user asked for something that cannot be done" (both sides).

The command line maps a `UsageError` to exit code 2 with its message and no traceback. Any
other exception that reaches it is a bug or an environment failure, reported as such (exit
code 70, with the traceback), so an internal error never passes for a user's mistake.
`UsageError` is a `ValueError`: code that catches bad values keeps working.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A setting, argument or input the user gave cannot be used; the message says what to change."""
