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


def module_lines(errors: list[tuple[str, str]]) -> list[str]:
    """(module, reason) pairs as one line per reason, naming how many modules and the first three (a scheme a
    method cannot solve is one reason on every linear: 210 lines on SmolLM2 otherwise).

    Example:
        >>> module_lines([("a", "bad"), ("b", "bad"), ("c", "worse")])
        ['2 modules (a, b): bad', 'c: worse']
    """
    by_reason: dict[str, list[str]] = {}
    for name, reason in errors:
        names = by_reason.setdefault(reason, [])
        if name not in names:
            names.append(name)
    return [f"{names[0]}: {reason}" if len(names) == 1 else
            f"{len(names)} modules ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): {reason}"
            for reason, names in by_reason.items()]


def grouped_lines(errors: list[str]) -> list[str]:
    """Per-module error lines "<module>: <reason>" (a name without spaces) merged per reason as `module_lines` does,
    in the order first seen; other lines kept as they are. For lists whose lines all name modules.

    Example:
        >>> grouped_lines(["a.weight: bad", "b.weight: bad", "nothing matched"])
        ['2 modules (a.weight, b.weight): bad', 'nothing matched']
    """
    pairs: list[tuple[str | None, str]] = []
    for line in errors:
        name, sep, reason = line.partition(": ")
        pairs.append((name, reason) if sep and name and " " not in name else (None, line))
    out: list[str] = []
    named = [(n, r) for n, r in pairs if n is not None]
    merged = iter(module_lines(named))
    seen: set[str] = set()
    for name, reason in pairs:
        if name is None:
            out.append(reason)
        elif reason not in seen:
            seen.add(reason)
            out.append(next(merged))
    return out
