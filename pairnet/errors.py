"""The one exception type for problems a user can cause."""


class PairnetError(Exception):
    """A bad input (file, parameter, model name, server...) described in one line.

    The CLI prints ``str(err)`` to stderr and exits with status 2; it never shows a
    traceback for this type.
    """
