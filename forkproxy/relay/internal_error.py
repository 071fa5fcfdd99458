"""What an exception escaping a connection's own code becomes: an abort and one warning.

Every loop callback of a connection (the poller's dispatch, the connect callbacks, the
sweeps, the accept batch, the resolver's task) hands an exception it did not expect to its
owner, which releases what that one connection holds (its admission, one token for the
global and the per-source caps; both sockets; its pipes), aborts it as a relay aborts
(`INTERNAL_ERROR`, see splice.py) and logs one warning line with `describe` (at most one
per interval, with a count); the traceback goes to the debug level. Other connections
and the worker go on. Never releases anything itself.
"""

import errno
import logging
import os

from forkproxy import logs

# What a relay aborted after an internal error records: ECONNABORTED, "software caused
# connection abort", is one of the errors logged at debug level only, so the internal
# error's own warning is the only line.
INTERNAL_ERROR = OSError(errno.ECONNABORTED, f"{os.strerror(errno.ECONNABORTED)} (internal error)")


def describe(error: BaseException) -> str:
    """`RuntimeError: text (in _on_readable, splice.py:180)`: the exception and where the
    innermost frame of its traceback was."""
    text = f"{type(error).__name__}: {error}"
    frame = error.__traceback__
    if frame is None:
        return text
    while frame.tb_next is not None:
        frame = frame.tb_next
    code = frame.tb_frame.f_code
    return f"{text} (in {code.co_name}, {os.path.basename(code.co_filename)}:{frame.tb_lineno})"


class InternalErrors:
    """A worker's (or a one-shot relay's) warnings about internal errors, rate-limited."""

    __slots__ = ("_log", "_lines")

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._lines = logs.RateLimitedLog(log, logging.WARNING)

    def report(self, what: str, error: BaseException) -> None:
        """One warning: `internal error <what>: <describe(error)>, closing connection`."""
        self._lines.log("internal error %s: %s, closing connection", what, describe(error))
        self._log.debug("traceback of the internal error %s", what, exc_info=error)

    def report_other(self, what: str, error: BaseException) -> None:
        """An internal error that belongs to no connection: `..., ignoring`."""
        self._lines.log("internal error %s: %s, ignoring", what, describe(error))
        self._log.debug("traceback of the internal error %s", what, exc_info=error)
