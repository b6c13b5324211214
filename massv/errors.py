"""One exception family for mistakes a user can fix: a missing file, a wrong flag, a config or a model that
does not fit.

Why one family: the `massv` command prints these as one line that names what is wrong and where, and keeps
the traceback for `--debug`; anything else is a bug and keeps its traceback. Each class also derives from the
builtin a Python caller would expect (`FileNotFoundError`, `ValueError`), so `except FileNotFoundError` keeps
working.
"""

from __future__ import annotations


class MassvError(Exception):
    """A mistake the user can fix; the message says what is wrong, where, and how to fix it."""


class InputError(MassvError, ValueError):
    """A file, directory, flag or output-directory state that the command cannot use."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or directory that should exist does not."""


class CorruptFileError(InputError):
    """A file exists but cannot be read: cut short, not UTF-8, not valid JSON or safetensors."""


class DrafterMismatchError(MassvError, ValueError):
    """A drafter was trained for another target (other family, or other sizes) than the one it is given."""


def one_line(message: str) -> str:
    """The message on one line: newlines inside it would break the CLI's one-line promise."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())
