"""The access log's line: one ended connection's record to one line of logfmt or JSON.

This module only formats; it never opens, writes or rotates the log, and keeps no state.
Its C twin, csrc/access_log.c, writes the same bytes for every record (a test compares
them), so the engines' logs read alike.

A line, for each format (the keys and their order are the same)::

    time=2026-12-07T13:31:41.123Z listener=web client=127.0.0.1:5555 target=127.0.0.1:8080 \
worker=0 connect_ms=0.213 duration_ms=12.504 bytes_from_client=78 bytes_to_client=615 \
end=target-closed
    {"time":"2026-12-07T13:31:41.123Z","listener":"web",...,"end":"target-closed"}

- ``time``: the end, ISO 8601 UTC with milliseconds (truncated), from CLOCK_REALTIME ns.
- ``connect_ms``, ``duration_ms``: milliseconds with three decimals (truncated to the
  microsecond). No connect made (refused, no target, a bad PROXY header): logfmt leaves
  the value empty, JSON writes null. A negative duration is written as 0.
- Text values (listener, client, target, end): logfmt writes a value as it is unless it
  is empty (``target=``) or holds a space, a control character, ``"`` or ``=``; then it
  is quoted, as go-logfmt does. Inside quotes, and in every JSON string, ``"`` and
  ``\\`` are backslashed, newline, CR and tab are ``\\n \\r \\t``, other control
  characters (C0, DEL, C1) and lone surrogates (an undecodable byte that Python kept
  with "surrogateescape") are ``\\u00XX``/``\\udcXX``. Any other character is written as
  UTF-8, so a line is one line and valid UTF-8 whatever a name holds.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "END_REASONS",
    "AccessRecord",
    "Record",
    "format_json",
    "format_logfmt",
    "line_formatter",
]

# Why a connection ended: END_REASONS in the order of the C table (csrc/formats.h).
END_CLIENT_CLOSED = "client-closed"
END_TARGET_CLOSED = "target-closed"
END_CLIENT_RESET = "client-reset"
END_TARGET_RESET = "target-reset"
END_IDLE_TIMEOUT = "idle-timeout"
END_CONNECT_TIMEOUT = "connect-timeout"
END_CONNECT_FAILED = "connect-failed"
END_REFUSED_CAP = "refused-cap"
END_REFUSED_PER_SOURCE = "refused-per-source"
END_NO_TARGET = "no-target"
END_PROXY_HEADER_ERROR = "proxy-header-error"
END_STOPPED = "stopped"  # ended at the end of a graceful stop
END_REASONS = (
    END_CLIENT_CLOSED,
    END_TARGET_CLOSED,
    END_CLIENT_RESET,
    END_TARGET_RESET,
    END_IDLE_TIMEOUT,
    END_CONNECT_TIMEOUT,
    END_CONNECT_FAILED,
    END_REFUSED_CAP,
    END_REFUSED_PER_SOURCE,
    END_NO_TARGET,
    END_PROXY_HEADER_ERROR,
    END_STOPPED,
)


class Record(Protocol):
    """What a formatter reads: an `AccessRecord`, or any object with its fields (the
    worker's record in the making, which saves building one per line)."""

    @property
    def end_ns(self) -> int: ...
    @property
    def listener(self) -> str: ...
    @property
    def client(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def worker(self) -> int: ...
    @property
    def connect_ns(self) -> int: ...
    @property
    def duration_ns(self) -> int: ...
    @property
    def bytes_from_client(self) -> int: ...
    @property
    def bytes_to_client(self) -> int: ...
    @property
    def end(self) -> str: ...


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """One ended connection. Integers are int64; text is any str."""

    end_ns: int  # CLOCK_REALTIME at the end
    listener: str
    client: str  # address:port
    target: str  # the one used; "" if none
    worker: int  # the worker's slot
    connect_ns: int  # < 0: no connect was made
    duration_ns: int
    bytes_from_client: int
    bytes_to_client: int
    end: str  # one of END_REASONS


_NEEDS_QUOTES = re.compile('[\x00-\x20"=\x7f-\x9f\ud800-\udfff]')
_NEEDS_ESCAPE = re.compile('["\\\\\x00-\x1f\x7f-\x9f\ud800-\udfff]')
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_match(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT_ESCAPES.get(char) or f"\\u{ord(char):04x}"


def _quoted(text: str) -> str:
    return '"' + _NEEDS_ESCAPE.sub(_escape_match, text) + '"'


def _logfmt_value(text: str) -> str:
    return _quoted(text) if _NEEDS_QUOTES.search(text) else text


def _time_text(end_ns: int) -> str:
    seconds, millis = divmod(end_ns // 1_000_000, 1000)
    return f"{_second_text(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4)
def _second_text(seconds: int) -> str:
    """YYYY-MM-DDTHH:MM:SS of a second since the epoch; a busy log's lines of one second
    share it, so it is worked out once per second (a pure function's cache)."""
    days, second_of_day = divmod(seconds, 86400)
    # days since 1970-01-01 to a civil date (H. Hinnant, "chrono-compatible low-level date
    # algorithms"): the same integer steps as the C twin, for any int64.
    z = days + 719468
    era = z // 146097
    day_of_era = z - era * 146097
    year_of_era = (
        day_of_era - day_of_era // 1460 + day_of_era // 36524 - day_of_era // 146096
    ) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    month_index = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * month_index + 2) // 5 + 1
    month = month_index + 3 if month_index < 10 else month_index - 9
    year = year_of_era + era * 400 + (month <= 2)
    hour, rest = divmod(second_of_day, 3600)
    minute, second = divmod(rest, 60)
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"


def _ms_text(ns: int) -> str:
    ms, us = divmod(max(ns, 0) // 1000, 1000)
    return f"{ms}.{us:03d}"


def format_logfmt(record: Record) -> bytes:
    """The record as one logfmt line, newline included."""
    connect = _ms_text(record.connect_ns) if record.connect_ns >= 0 else ""
    line = (
        f"time={_time_text(record.end_ns)}"
        f" listener={_logfmt_value(record.listener)}"
        f" client={_logfmt_value(record.client)}"
        f" target={_logfmt_value(record.target)}"
        f" worker={record.worker}"
        f" connect_ms={connect}"
        f" duration_ms={_ms_text(record.duration_ns)}"
        f" bytes_from_client={record.bytes_from_client}"
        f" bytes_to_client={record.bytes_to_client}"
        f" end={_logfmt_value(record.end)}\n"
    )
    return line.encode()


def format_json(record: Record) -> bytes:
    """The record as one JSON object on one line, newline included."""
    connect = _ms_text(record.connect_ns) if record.connect_ns >= 0 else "null"
    line = (
        f'{{"time":"{_time_text(record.end_ns)}"'
        f',"listener":{_quoted(record.listener)}'
        f',"client":{_quoted(record.client)}'
        f',"target":{_quoted(record.target)}'
        f',"worker":{record.worker}'
        f',"connect_ms":{connect}'
        f',"duration_ms":{_ms_text(record.duration_ns)}'
        f',"bytes_from_client":{record.bytes_from_client}'
        f',"bytes_to_client":{record.bytes_to_client}'
        f',"end":{_quoted(record.end)}}}\n'
    )
    return line.encode()


def line_formatter(name: str) -> Callable[[Record], bytes]:
    """The formatter for --access-log-format ``name`` (logfmt or json)."""
    if name == "logfmt":
        return format_logfmt
    if name == "json":
        return format_json
    raise ValueError(f"unknown access log format {name!r}")
