"""The errors forkproxy reports to an operator.

A `ForkproxyError` carries the whole sentence an operator reads; `cli` prints it on
one line as `forkproxy: <message>` and exits non-zero. Anything else that escapes is a
bug and keeps its traceback.
"""


class ForkproxyError(Exception):
    """Something the user or the environment got wrong; the message says what."""


class UsageError(ForkproxyError):
    """A bad command line: option, value or argument count."""


class UsageErrors(UsageError):
    """Several bad settings found at once (a configuration file, --check).

    Its message is the first, with a count of the others, so it is still one line;
    `messages` has them all, one line each, for --check to print."""

    def __init__(self, messages: list[str]) -> None:
        more = len(messages) - 1
        others = f" (and {more} more: forkproxy --check lists them all)" if more else ""
        super().__init__(messages[0] + others)
        self.messages = messages
