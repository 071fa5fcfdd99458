"""The errors forkproxy reports to an operator.

A `ForkproxyError` carries the whole sentence an operator reads; `cli` prints it on
one line as `forkproxy: <message>` and exits non-zero. Anything else that escapes is a
bug and keeps its traceback.
"""


class ForkproxyError(Exception):
    """Something the user or the environment got wrong; the message says what."""


class UsageError(ForkproxyError):
    """A bad command line: option, value or argument count."""
