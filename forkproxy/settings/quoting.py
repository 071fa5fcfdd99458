"""User text made safe to echo in one line of an error, a log line or a process title.

What the user typed can hold anything argv can: control characters, bytes that are not
UTF-8 (argv decodes them as lone surrogates, surrogateescape), thousands of digits.
`printable` escapes what a terminal, journald or setproctitle(3) cannot take as it is;
`quote` adds the quotes and shortens what would drown the message; `digits_value` and
`whole_number` read digits without building a number too big to print (int() refuses
more than 4300 digits, leading zeros included, and so does str()). Pure: never does I/O.
"""

from forkproxy.errors import UsageError

# Longer text is cut in messages: a 107-byte unix socket path still shows whole.
_QUOTE_MAX = 160
_QUOTE_KEEP = 100
# More significant digits than any value a setting takes (int64 has 19).
_DIGITS_MAX = 19


def printable(text: str) -> str:
    """`text` with control characters escaped (\\n, \\x1b), and bytes that were not UTF-8
    shown as the bytes they were (\\xff)."""
    if text.isprintable():
        return text
    return "".join(_escape(char) for char in text)


def _escape(char: str) -> str:
    if char.isprintable():
        return char
    if "\udc80" <= char <= "\udcff":  # surrogateescape: the byte 0x80-0xff
        return f"\\x{ord(char) - 0xDC00:02x}"
    return repr(char)[1:-1]


def quote(text: str) -> str:
    """`text` in single quotes for a message, escaped, and shortened when very long."""
    shown = printable(text)
    if len(shown) <= _QUOTE_MAX:
        return f"'{shown}'"
    return f"'{shown[:_QUOTE_KEEP]}...' ({len(text)} characters)"


def whole_number(text: str, what: str) -> int:
    """ASCII digits (blanks around allowed) as an int; UsageError quoting `text` otherwise.

    `what` names the field, as in "--workers= value". A number too long for any setting
    is refused here, before int() (which refuses more than 4300 digits) or a message
    echoing it.
    """
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()):
        raise UsageError(f"invalid {what} {quote(text)}: expected a whole number")
    value = digits_value(digits, _DIGITS_MAX)
    if value is None:
        raise UsageError(f"invalid {what} {quote(text)}: number too large")
    return value


def digits_value(digits: str, most: int) -> int | None:
    """The value of a run of ASCII digits, or None if it has more than `most` significant
    digits (a number out of the caller's range)."""
    significant = digits.lstrip("0")
    if len(significant) > most:
        return None
    return int(significant or "0")
