"""Each option's value syntax: from its text to the typed value, and back for display.

One table, `VALUES`, by argparse dest, serves the command line and the configuration
file alike, so a value means the same and is refused with the same reason wherever it
is written. Each parser takes the text and `what`, how its error names the value: the
command line says `--connect-timeout= value`, the file (whose error names the key
already) says `time span`. Flags (`--nodelay`, `--inetd`) have no text and no entry.
Never touches sockets or files.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forkproxy.errors import UsageError
from forkproxy.settings.address import (
    TargetAddress,
    parse_listen,
    parse_metrics,
    parse_route,
    parse_target,
)
from forkproxy.settings.config import (
    BALANCE_MODES,
    PIPE_SIZE_MAX,
    PIPE_SIZE_MIN,
    http_path_problem,
)
from forkproxy.settings.options import (
    KeepAlive,
    format_size,
    parse_keepalive,
    parse_on_limit,
    parse_proxy_protocol,
    parse_size,
)
from forkproxy.settings.quoting import quote, whole_number
from forkproxy.settings.timespan import format_timespan, parse_timespan

# What a bare --keepalive (no value) stands for: the kernel's timings. A NUL can never
# come from a real argv (exec passes C strings), so it marks "no value given".
BARE_KEEPALIVE = "\0"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class ValueSyntax:
    """How one option's value is read and shown."""

    parse: Callable[[str, str], Any]  # (text, what) -> value; UsageError quoting text
    noun: str  # `what` in a configuration file's error: "time span"
    format: Callable[[Any], str] = str  # the value as command-line text


def time_span(text: str, what: str) -> float:
    return parse_timespan(text, what)


def file_mode(text: str, what: str) -> int:
    stripped = text.strip()
    digits = stripped.lstrip("0")
    if not stripped or len(digits) > 3 or any(digit not in "01234567" for digit in digits):
        raise UsageError(f"invalid {what} {quote(text)}: expected octal 0000-0777")
    return int(digits or "0", 8)


def pipe_size(text: str, what: str) -> int:
    """--pipe-size, its range checked here so the error quotes what the user typed."""
    size = parse_size(text, "", what)
    if not PIPE_SIZE_MIN <= size <= PIPE_SIZE_MAX:
        raise UsageError(
            f"--pipe-size= must be in {format_size(PIPE_SIZE_MIN)}-{format_size(PIPE_SIZE_MAX)}, "
            f"got {quote(text)}"
        )
    return size


def log_level(text: str, what: str) -> str:
    if text not in LOG_LEVELS:
        raise UsageError(f"invalid {what} {quote(text)}: expected debug, info, warning or error")
    return text


def keepalive(text: str, what: str) -> KeepAlive:
    return KeepAlive() if text == BARE_KEEPALIVE else parse_keepalive(text, what)


def _format_keepalive(value: KeepAlive) -> str:
    """IDLE,INTERVAL,PROBES; "" for the kernel's timings (the bare option)."""
    if value.idle is None or value.interval is None:
        return ""
    return f"{format_timespan(value.idle)},{format_timespan(value.interval)},{value.probes}"


def http_path(text: str, what: str) -> str:
    """--check-http PATH: the path of an HTTP check, as sent in its request line."""
    problem = http_path_problem(text) if text else "must be a path starting with '/'"
    if problem is not None:
        raise UsageError(f"invalid {what} {quote(text)}: it {problem}")
    return text


def balance_mode(text: str, what: str) -> str:
    """--balance MODE: how a route picks its target."""
    if text not in BALANCE_MODES:
        raise UsageError(
            f"invalid {what} {quote(text)}: expected one of {', '.join(BALANCE_MODES)}"
        )
    return text


def _route(text: str, what: str) -> tuple[str, TargetAddress]:
    return parse_route(text)


VALUES: dict[str, ValueSyntax] = {
    # Global options (arguments.py).
    "targets": ValueSyntax(lambda text, what: parse_target(text), "target", lambda t: t.text),
    "connections_max": ValueSyntax(whole_number, "number"),
    "exit_idle_time": ValueSyntax(time_span, "time span", format_timespan),
    "workers": ValueSyntax(whole_number, "number"),
    "listen": ValueSyntax(
        lambda text, what: parse_listen(text), "listen address", lambda a: a.text
    ),
    "socket_mode": ValueSyntax(file_mode, "file mode", lambda mode: f"{mode:04o}"),
    "metrics": ValueSyntax(
        lambda text, what: parse_metrics(text), "metrics address", lambda a: a.text
    ),
    "graceful_timeout": ValueSyntax(time_span, "time span", format_timespan),
    "worker_timeout": ValueSyntax(time_span, "time span", format_timespan),
    "log_level": ValueSyntax(log_level, "log level"),
    # Relay options (relay_arguments.py).
    "proxy_protocol": ValueSyntax(
        lambda text, what: parse_proxy_protocol(text, what), "value", lambda v: f"v{v}"
    ),
    "connect_timeout": ValueSyntax(time_span, "time span", format_timespan),
    "idle_timeout": ValueSyntax(time_span, "time span", format_timespan),
    "keepalive": ValueSyntax(keepalive, "value", _format_keepalive),
    "pipe_size": ValueSyntax(pipe_size, "size", format_size),
    "on_limit": ValueSyntax(lambda text, what: parse_on_limit(text, what), "value"),
    "connections_max_per_source": ValueSyntax(whole_number, "number"),
    "datagram_timeout": ValueSyntax(time_span, "time span", format_timespan),
    "datagram_replies": ValueSyntax(whole_number, "number"),
    "check_interval": ValueSyntax(time_span, "time span", format_timespan),
    "check_http": ValueSyntax(http_path, "path"),
    "check_rise": ValueSyntax(whole_number, "number"),
    "check_fall": ValueSyntax(whole_number, "number"),
    "check_timeout": ValueSyntax(time_span, "time span", format_timespan),
    "balance": ValueSyntax(balance_mode, "balancing mode"),
    "backup": ValueSyntax(lambda text, what: parse_target(text), "target", lambda t: t.text),
    "connect_retry": ValueSyntax(time_span, "time span", format_timespan),
    "route": ValueSyntax(_route, "route", lambda route: f"{route[0]}={route[1].text}"),
}


def command_line_what(dest: str) -> str:
    """How a command-line error names the value of the option with this dest."""
    return f"--{dest.replace('_', '-')}= value"
