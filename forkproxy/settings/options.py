"""Value syntax of the relay options, from command-line text to typed values.

`--pipe-size=BYTES` (K and M suffixes, base 1024), `--keepalive=IDLE,INTERVAL,PROBES`,
`--proxy-protocol=v1|v2` and `--on-limit=refuse|queue`. Each parser quotes what the user
typed in its `UsageError`. Never reads the environment, never opens sockets; the
`tcp_socket_options` table is what the worker later hands to setsockopt(2).
"""

import socket
from dataclasses import dataclass

from forkproxy.errors import UsageError
from forkproxy.settings.quoting import quote, whole_number
from forkproxy.settings.timespan import parse_timespan

ON_LIMIT_REFUSE = "refuse"
ON_LIMIT_QUEUE = "queue"
ON_LIMIT_MODES = (ON_LIMIT_REFUSE, ON_LIMIT_QUEUE)

# tcp(7): TCP_KEEPIDLE and TCP_KEEPINTVL take whole seconds up to MAX_TCP_KEEPIDLE and
# MAX_TCP_KEEPINTVL (32767), TCP_KEEPCNT up to MAX_TCP_KEEPCNT (127).
KEEPALIVE_SECONDS_MAX = 32767
KEEPALIVE_PROBES_MAX = 127

_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 * 1024}


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """TCP keep-alive for both sides of a connection; None fields keep the kernel's value
    (net.ipv4.tcp_keepalive_time, _intvl, _probes)."""

    idle: int | None = None  # seconds without traffic before the first probe
    interval: int | None = None  # seconds between probes
    probes: int | None = None  # unanswered probes before the connection is dropped


def parse_size(text: str, option: str, what: str | None = None) -> int:
    """BYTES with an optional K or M suffix (base 1024): 65536, 64K, 1M.

    An error quotes `text` as "invalid `what`" (default: "`option`= value")."""
    what = what or f"{option}= value"
    stripped = text.strip()
    number, unit = stripped, ""
    if stripped[-1:].upper() in ("K", "M"):
        number, unit = stripped[:-1], stripped[-1].upper()
    if not (number.isascii() and number.isdigit()):
        raise UsageError(
            f"invalid {what} {quote(text)}: expected a number of bytes, "
            "optionally with K or M (base 1024)"
        )
    return whole_number(number, what) * _SIZE_UNITS[unit]


def format_size(size: int) -> str:
    """The shortest of BYTES, nK, nM that `parse_size` reads back as `size`."""
    for unit in ("M", "K"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def parse_keepalive(text: str, what: str = "--keepalive= value") -> KeepAlive:
    """IDLE,INTERVAL,PROBES: two time spans (whole seconds) and a count."""
    parts = text.split(",")
    if len(parts) != 3:
        raise UsageError(
            f"invalid {what} {quote(text)}: expected IDLE,INTERVAL,PROBES "
            "(as in 60s,10s,6), or no value for the kernel's timings"
        )
    idle = _keepalive_seconds(parts[0], text, "IDLE", what)
    interval = _keepalive_seconds(parts[1], text, "INTERVAL", what)
    probes_text = parts[2].strip()
    if not (probes_text.isascii() and probes_text.isdigit()):
        raise UsageError(
            f"invalid {what} {quote(text)}: PROBES {quote(parts[2])} is not a whole number"
        )
    probes = whole_number(probes_text, "--keepalive= PROBES")
    if not 1 <= probes <= KEEPALIVE_PROBES_MAX:
        raise UsageError(
            f"invalid {what} {quote(text)}: PROBES must be in 1-{KEEPALIVE_PROBES_MAX}"
        )
    return KeepAlive(idle, interval, probes)


def _keepalive_seconds(part: str, text: str, field: str, what: str) -> int:
    seconds = parse_timespan(part, f"--keepalive= {field}")
    if not 1 <= seconds <= KEEPALIVE_SECONDS_MAX or seconds != int(seconds):
        raise UsageError(
            f"invalid {what} {quote(text)}: {field} must be whole seconds "
            f"in 1s-{KEEPALIVE_SECONDS_MAX}s"
        )
    return int(seconds)


def parse_proxy_protocol(text: str, what: str = "--proxy-protocol= value") -> int:
    """v1 or v2: the PROXY protocol version to send."""
    versions = {"v1": 1, "v2": 2}
    version = versions.get(text.strip().lower())
    if version is None:
        raise UsageError(f"invalid {what} {quote(text)}: expected v1 or v2")
    return version


def parse_on_limit(text: str, what: str = "--on-limit= value") -> str:
    """refuse or queue: what happens to a client while the connection cap is reached."""
    mode = text.strip().lower()
    if mode not in ON_LIMIT_MODES:
        raise UsageError(f"invalid {what} {quote(text)}: expected refuse or queue")
    return mode


def tcp_socket_options(
    nodelay: bool, keepalive: KeepAlive | None
) -> tuple[tuple[int, int, int], ...]:
    """(level, option, value) for setsockopt(2) on each TCP end of a connection."""
    options: list[tuple[int, int, int]] = []
    if nodelay:
        options.append((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
    if keepalive is not None:
        options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        for option, value in (
            (socket.TCP_KEEPIDLE, keepalive.idle),
            (socket.TCP_KEEPINTVL, keepalive.interval),
            (socket.TCP_KEEPCNT, keepalive.probes),
        ):
            if value is not None:
                options.append((socket.IPPROTO_TCP, option, value))
    return tuple(options)
