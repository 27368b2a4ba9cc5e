"""The exceptions that mean "the user gave us something wrong", as opposed to a bug of ours.

Every CLI's error boundary prints a `UserError` as one clear message (no traceback) and exits non-zero;
anything else is our bug and keeps its traceback. They subclass ValueError so callers that already catch
ValueError for bad input keep working.
"""
from __future__ import annotations

import os


class UserError(ValueError):
    """A mistake in what the user gave us (a config value, a path, a file): the message says what and how to fix it."""


class ConfigError(UserError):
    """A bad configuration value; the message names the key and what would be valid."""


class BadFileError(UserError):
    """A file or folder that is missing, incomplete, corrupt or hostile; the message names it and what is wrong.

    Attributes:
        path: the offending file or folder.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
