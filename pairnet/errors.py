"""The project's exception types: problems a user can cause, and work that failed."""


class PairnetError(Exception):
    """A bad input (file, parameter, model name, server...) described in one line.

    The CLI prints ``str(err)`` to stderr and exits with ``exit_code``, 2 (a usage error); it
    never shows a traceback for this type.
    """

    exit_code = 2


class PairnetRuntimeError(PairnetError):
    """The inputs were fine but the work failed (training members, tune workers): one line,
    exit status 1."""

    exit_code = 1
