"""The one user-facing error type.

Raise `MpdeployError` for anything the user can fix (bad path, bad flag, corrupt artifact). The CLI
prints its message on one line and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MpdeployError(Exception):
    """A problem with the user's input. The message says what is wrong and how to fix it."""

    exit_code = 2
