"""Errors a user can fix (a missing file, a wrong argument). Scripts print the message and exit non-zero
instead of showing a traceback; see ``utils.runtime.run_script``."""
from pathlib import Path


class UserError(Exception):
    """Something the user can fix; the message says what, where and how."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A data file or folder is missing; the message names the path and where to get the data."""


class UnreadableFileError(UserError):
    """A file is there but is not what it should be: truncated, corrupt, or another kind of file."""


def unreadable(path: str | Path, what: str, cause: BaseException | str, remedy: str) -> UnreadableFileError:
    """The one-paragraph error for a file that cannot be read as ``what``: the file, what is wrong (a string,
    or the reader's exception cut to its first sentence: library messages run on, and some give advice that
    does not apply here) and ``remedy``, what to do about it."""
    detail = cause
    if isinstance(cause, BaseException):
        first = str(cause).strip().split("\n")[0].split(". ")[0]
        detail = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
    return UnreadableFileError(f"{path} is not a readable {what} ({detail}): it is truncated or corrupt, or "
                               f"another kind of file. {remedy}")
