"""User-facing errors.

Every mistake a user can make (a missing file, a malformed record, an unknown config key, ...)
raises :class:`UserError`. The CLI prints its message on one line and exits with code 2, without
a traceback; the Python API lets it propagate so notebooks see a normal exception.
"""


class UserError(Exception):
    """An error caused by the user's input, with a message that says where and what to do."""

    exit_code = 2


class ConfigError(UserError):
    """A problem in a configuration file or a ``key=value`` override."""


class DataError(UserError):
    """A problem in a data file or a record."""


class ForgetlessWarning(UserWarning):
    """Something in the user's input that forgetless works around but the user should know (shown once)."""
