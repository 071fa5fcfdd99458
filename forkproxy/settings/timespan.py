"""systemd time spans (systemd.time(7)) to float seconds, and back.

Accepts exactly what systemd's parse_sec() accepts, so a unit file that works with
systemd-socket-proxyd works with forkproxy: a unit-less number of seconds, or numbers
with units, summed ("5min 20s", "1.5s", "2h", "500ms"), or "infinity". Never does I/O.
"""

import math

from forkproxy.errors import UsageError
from forkproxy.settings.quoting import digits_value, quote

_USEC_PER_SEC = 1_000_000
_USEC_PER_MINUTE = 60 * _USEC_PER_SEC
_USEC_PER_HOUR = 60 * _USEC_PER_MINUTE
_USEC_PER_DAY = 24 * _USEC_PER_HOUR
_USEC_PER_WEEK = 7 * _USEC_PER_DAY
_USEC_PER_MONTH = 2_629_800 * _USEC_PER_SEC  # 30.44 days, as systemd defines it
_USEC_PER_YEAR = 31_557_600 * _USEC_PER_SEC  # 365.25 days
_USEC_INFINITY = 2**64 - 1
_USEC_INFINITY_DIGITS = len(str(_USEC_INFINITY))  # any longer number is too large

# Order matters: systemd takes the first suffix that prefixes the rest of the input,
# so "ms" must come before "m", and "months" before "m".
_UNITS: tuple[tuple[str, int], ...] = (
    ("seconds", _USEC_PER_SEC),
    ("second", _USEC_PER_SEC),
    ("sec", _USEC_PER_SEC),
    ("s", _USEC_PER_SEC),
    ("minutes", _USEC_PER_MINUTE),
    ("minute", _USEC_PER_MINUTE),
    ("min", _USEC_PER_MINUTE),
    ("months", _USEC_PER_MONTH),
    ("month", _USEC_PER_MONTH),
    ("M", _USEC_PER_MONTH),
    ("msec", 1000),
    ("ms", 1000),
    ("m", _USEC_PER_MINUTE),
    ("hours", _USEC_PER_HOUR),
    ("hour", _USEC_PER_HOUR),
    ("hr", _USEC_PER_HOUR),
    ("h", _USEC_PER_HOUR),
    ("days", _USEC_PER_DAY),
    ("day", _USEC_PER_DAY),
    ("d", _USEC_PER_DAY),
    ("weeks", _USEC_PER_WEEK),
    ("week", _USEC_PER_WEEK),
    ("w", _USEC_PER_WEEK),
    ("years", _USEC_PER_YEAR),
    ("year", _USEC_PER_YEAR),
    ("y", _USEC_PER_YEAR),
    ("usec", 1),
    ("us", 1),
    ("\u03bcs", 1),  # GREEK SMALL LETTER MU
    ("\u00b5s", 1),  # MICRO SIGN
)

_WHITESPACE = " \t\n\r"
_DIGITS = "0123456789"


class _SpanSyntaxError(Exception):
    """Internal: why a span was rejected; turned into a UsageError quoting the input."""


def parse_timespan(text: str, option: str = "time span") -> float:
    """Return the span `text` in seconds (math.inf for "infinity").

    Raises UsageError naming `option` and quoting `text` when systemd would reject it.
    """
    try:
        usec = _parse_usec(text)
    except _SpanSyntaxError as error:
        raise UsageError(f"invalid {option} {quote(text)}: {error}") from None
    return math.inf if usec == _USEC_INFINITY else usec / _USEC_PER_SEC


def _parse_usec(text: str) -> int:
    p = text.lstrip(_WHITESPACE)
    if p.startswith("infinity"):
        if p[len("infinity") :].strip(_WHITESPACE):
            raise _SpanSyntaxError("nothing may follow 'infinity'")
        return _USEC_INFINITY

    total = 0
    something = False
    while True:
        p = p.lstrip(_WHITESPACE)
        if not p:
            if not something:
                raise _SpanSyntaxError("empty")
            return total
        if p[0] == "-":
            raise _SpanSyntaxError("negative spans are not allowed")

        # strtoll(): an optional '+', then digits; with no digits it consumes nothing.
        start = 1 if p[0] == "+" else 0
        i = start
        while i < len(p) and p[i] in _DIGITS:
            i += 1
        if i > start:
            value = digits_value(p[start:i], _USEC_INFINITY_DIGITS)
            if value is None:
                raise _SpanSyntaxError("too large")
            whole = value
        else:
            whole, i = 0, 0
        fraction = ""
        if i < len(p) and p[i] == ".":
            j = i + 1
            while j < len(p) and p[j] in _DIGITS:
                j += 1
            fraction = p[i + 1 : min(j, i + 1 + _USEC_INFINITY_DIGITS)]  # the rest is < 1us
            if not fraction:
                raise _SpanSyntaxError("a '.' must be followed by digits")
            i = j
        elif i == 0:
            raise _SpanSyntaxError(f"expected a number at {quote(p)}")

        rest = p[i:]
        unit_text = rest.lstrip(_WHITESPACE)
        multiplier, unit_length = _match_unit(unit_text)
        if unit_length == 0 and rest and rest[0] not in _WHITESPACE:
            raise _SpanSyntaxError(f"unknown unit {quote(_word(rest))}")
        p = unit_text[unit_length:] if unit_length else rest

        if whole >= _USEC_INFINITY // multiplier:
            raise _SpanSyntaxError("too large")
        total += whole * multiplier
        # Fractional digits below the microsecond are dropped, as systemd does.
        scale = multiplier // 10
        for digit in fraction:
            total += int(digit) * scale
            scale //= 10
        if total >= _USEC_INFINITY:
            raise _SpanSyntaxError("too large")
        something = True
        if unit_length and p and p[0] not in _WHITESPACE and p[0] not in _DIGITS + "+.":
            raise _SpanSyntaxError(f"unknown unit {quote(_word(unit_text))}")


def _match_unit(text: str) -> tuple[int, int]:
    """The multiplier and length of the unit that prefixes `text`; (seconds, 0) if none."""
    for suffix, multiplier in _UNITS:
        if text.startswith(suffix):
            return multiplier, len(suffix)
    return _USEC_PER_SEC, 0


def _word(text: str) -> str:
    """The leading run of non-blank, non-digit characters, for error messages."""
    end = 0
    while end < len(text) and text[end] not in _WHITESPACE + _DIGITS:
        end += 1
    return text[:end] or text[:1]


_FORMAT_UNITS: tuple[tuple[str, int], ...] = (
    ("y", _USEC_PER_YEAR),
    ("month", _USEC_PER_MONTH),
    ("w", _USEC_PER_WEEK),
    ("d", _USEC_PER_DAY),
    ("h", _USEC_PER_HOUR),
    ("min", _USEC_PER_MINUTE),
    ("s", _USEC_PER_SEC),
    ("ms", 1000),
    ("us", 1),
)


def format_timespan(seconds: float) -> str:
    """Seconds as systemd writes spans ("1min 30s", "500ms", "infinity"); parses back."""
    if math.isinf(seconds):
        return "infinity"
    usec = round(seconds * _USEC_PER_SEC)
    if usec == 0:
        return "0"
    parts = []
    for suffix, size in _FORMAT_UNITS:
        count, usec = divmod(usec, size)
        if count:
            parts.append(f"{count}{suffix}")
    return " ".join(parts)
