"""Errors a user can fix (a missing file, a wrong argument). Scripts print the message and exit non-zero
instead of showing a traceback; see ``utils.runtime.run_script``."""


class UserError(Exception):
    """Something the user can fix; the message says what, where and how."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A data file or folder is missing; the message names the path and where to get the data."""
