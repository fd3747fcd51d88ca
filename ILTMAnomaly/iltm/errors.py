"""User-facing errors: the CLI prints ``iltm: error: <where>: <problem>`` on one line and exits with code 2."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """A problem with something the user gave us (a file, a folder, a flag), never a bug in iltm.

    Args:
        where: the file, folder or option at fault.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, where: str | Path, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")


class WriteError(InputError):
    """An output that could not be written (disk full, read-only folder): the command stops, whatever it does with
    a bad input."""


def printable(text: str) -> str:
    """``text`` on one line: control characters and bytes that are not UTF-8 shown as escapes."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)
