"""The relay options' part of the command line, for `arguments`.

Their argparse definitions with help text, the getopt-style optional values of
`-p/--proxy-protocol[=v1|v2]` and `--keepalive[=IDLE,INTERVAL,PROBES]` and the prefixes
of systemd-socket-proxyd's own options. Their values are read by option_values.py.
Part of `arguments`: never touches sockets or processes.
"""

import argparse
import re

from forkproxy.errors import UsageError
from forkproxy.settings.config import (
    DEFAULT_CHECK_FALL,
    DEFAULT_CHECK_RISE,
    DEFAULT_CHECK_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DATAGRAM_TIMEOUT,
    DEFAULT_NODELAY,
    DEFAULT_PIPE_SIZE,
)
from forkproxy.settings.option_values import BARE_KEEPALIVE
from forkproxy.settings.options import format_size
from forkproxy.settings.quoting import quote
from forkproxy.settings.timespan import format_timespan, parse_timespan

# What a bare -p/--proxy-protocol or --keepalive stands for.
_BARE = {"--proxy-protocol": "v1", "--keepalive": BARE_KEEPALIVE}
# The same by dest: what `true` stands for in a configuration file.
BARE_VALUES = {option[2:].replace("-", "_"): text for option, text in _BARE.items()}
# systemd-socket-proxyd's own long options (--proxy-protocol since its PROXY protocol
# support). It reads them with getopt_long, which takes any unambiguous prefix, so
# `--conn=10` or `--exit-idle=5min` may stand in a unit file written for it: such a
# prefix keeps its meaning here. Prefixes of forkproxy's other options are refused
# (argparse's allow_abbrev=False), so `--inet` is not `--inetd`.
_SOCKET_PROXYD_OPTIONS = (
    "--connections-max",
    "--exit-idle-time",
    "--help",
    "--version",
    "--proxy-protocol",
)
# How --help shows the options whose value is optional: attached, or none.
OPTIONAL_VALUE_TERMS = {
    "proxy_protocol": "-p[VERSION], --proxy-protocol[=VERSION]",
    "keepalive": "--keepalive[=IDLE,INTERVAL,PROBES]",
}
# A word after a bare -p that reads as a version, not a target: v2, V1, v3.
_VERSION_WORD = re.compile(r"\s*[vV][0-9]+\s*")


def add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the relay options on `parser`."""
    parser.add_argument(
        "-p",
        "--proxy-protocol",
        metavar="VERSION",
        help="send a PROXY protocol header (v1 text or v2 binary) with the client's address "
        "first on every connection to a target; alone it means v1, and a version is "
        "given attached only: -pv2, --proxy-protocol=v2",
    )
    parser.add_argument(
        "--connect-timeout",
        metavar="TIME",
        help="give up connecting to a target after TIME and close the client "
        f"(default {format_timespan(DEFAULT_CONNECT_TIMEOUT)})",
    )
    parser.add_argument(
        "--idle-timeout",
        metavar="TIME",
        help="close a connection after TIME without a byte either way (default infinity)",
    )
    parser.add_argument(
        "--keepalive",
        metavar="IDLE,INTERVAL,PROBES",
        help="TCP keep-alive on both sides: probe after IDLE without traffic, every "
        "INTERVAL, drop after PROBES unanswered; alone: the kernel's timings (the value "
        "is given attached only: --keepalive=60s,10s,6)",
    )
    parser.add_argument(
        "--nodelay",
        action=argparse.BooleanOptionalAction,
        help="TCP_NODELAY on both sides: send small writes at once "
        f"(default {'on' if DEFAULT_NODELAY else 'off'})",
    )
    parser.add_argument(
        "--pipe-size",
        metavar="BYTES",
        help="splice pipe size per direction, with K or M for KiB or MiB "
        f"(default {format_size(DEFAULT_PIPE_SIZE)})",
    )
    parser.add_argument(
        "--on-limit",
        metavar="MODE",
        help="at the connection cap: refuse (accept and close at once, the default) or "
        "queue (stop accepting; clients wait in the listen backlog)",
    )
    parser.add_argument(
        "--connections-max-per-source",
        metavar="N",
        help="most connections from one client IP address at once, across all workers; "
        "more are refused (default 0: no limit)",
    )
    # Its first spelling, kept working; --help shows the one above.
    parser.add_argument(
        "--max-connections-per-source", dest="connections_max_per_source", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--route",
        metavar="NAME=TARGET",
        action="append",
        default=[],
        help="relay connections from the listener named NAME (FileDescriptorName=, "
        "--listen NAME=ADDR) to TARGET instead; repeatable",
    )
    parser.add_argument(
        "--datagram-timeout",
        metavar="TIME",
        help="end a datagram session (UDP, unix datagram) after TIME without a datagram "
        f"either way (default {format_timespan(DEFAULT_DATAGRAM_TIMEOUT)})",
    )
    parser.add_argument(
        "--datagram-replies",
        metavar="N",
        help="end a datagram session after N replies to its client, as for DNS "
        "(default 0: no limit)",
    )
    add_check_arguments(parser)
    add_balance_arguments(parser)


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The active health check options (relay options too: per listener in a file)."""
    parser.add_argument(
        "--check-interval",
        metavar="TIME",
        help="check every target every TIME from the master, by connecting (default 0: "
        "no checks); workers send no client to a target the checks find down",
    )
    parser.add_argument(
        "--check-http",
        metavar="PATH",
        help="check with an HTTP/1.1 GET of PATH instead, expecting a 2xx or 3xx status",
    )
    parser.add_argument(
        "--check-rise",
        metavar="N",
        help=f"checks passed in a row that bring a target back up (default {DEFAULT_CHECK_RISE})",
    )
    parser.add_argument(
        "--check-fall",
        metavar="N",
        help=f"checks failed in a row that mark a target down (default {DEFAULT_CHECK_FALL})",
    )
    parser.add_argument(
        "--check-timeout",
        metavar="TIME",
        help="a check taking longer fails (default the interval, at most "
        f"{format_timespan(DEFAULT_CHECK_TIMEOUT)})",
    )


def add_balance_arguments(parser: argparse.ArgumentParser) -> None:
    """Which target a connection goes to (relay options too: per listener in a file)."""
    parser.add_argument(
        "--balance",
        metavar="MODE",
        help="pick targets by round-robin (the default, across all workers), "
        "least-connections (fewest open across all workers), source (by the client's "
        "IP address: one client keeps its target while it is up) or first (the first "
        "usable: failover order)",
    )
    parser.add_argument(
        "--backup",
        metavar="TARGET",
        action="append",
        default=[],
        help="a target used only while no other target is usable (up, and not cooling "
        "down after a failed connect); repeatable, tried in order",
    )
    parser.add_argument(
        "--connect-retry",
        metavar="TIME",
        help="while every target refuses (not listening yet), keep the client and retry "
        "for up to TIME, waiting from 50ms to 1s between rounds (default 0: no retries)",
    )


def attach_optional_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """argv with every optional value attached and socket-proxyd's prefixes spelled out.

    As getopt_long reads an optional_argument, `-p` and `--proxy-protocol`/`--keepalive`
    take a value only attached (`-pv2`, `--proxy-protocol=v2`, `--keepalive=60s,10s,6`);
    alone they get their bare meaning, and the next word stays a target. A next word
    that only makes sense as their value (`-p v2`, `--keepalive 60s,10s,6`) is refused
    rather than taken for a target. A prefix of a systemd-socket-proxyd option becomes
    that option (see _SOCKET_PROXYD_OPTIONS).
    """
    long_options = {text for text in parser._option_string_actions if text.startswith("--")}
    result: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if token == "--":
            result.append(token)
            result.extend(argv[index:])
            break
        if token.startswith("-p") and not token.startswith("--") and len(token) > 2:
            result.append("--proxy-protocol=" + token[2:])
            continue
        token = _socket_proxyd_prefix(token, long_options)
        option = "--proxy-protocol" if token == "-p" else token
        if option not in _BARE:
            result.append(token)
            continue
        following = argv[index] if index < len(argv) else None
        if following is not None and _looks_like_value_of(option, following):
            raise _detached_value(token, option, following)
        result.append(f"{option}={_BARE[option]}")
    return result


def _detached_value(typed: str, option: str, word: str) -> UsageError:
    """The error for `-p v2` or `--keepalive 60s,10s,6`: the value was not attached."""
    value = word.strip() if len(word) <= 40 and word.isprintable() else None
    if option == "--proxy-protocol":
        example = value or "v2"
        return UsageError(
            f"option '{typed}' takes its version attached: write -p{example} or "
            f"--proxy-protocol={example} (a target host named {quote(word)} needs its port, "
            f"as in {example}:80)"
        )
    return UsageError(
        f"option '{typed}' takes its value attached: write "
        f"--keepalive={value or 'IDLE,INTERVAL,PROBES'} ({quote(word)} is no target)"
    )


def _socket_proxyd_prefix(token: str, long_options: set[str]) -> str:
    """`token` with a prefix of a systemd-socket-proxyd option spelled out in full."""
    name, equals, value = token.partition("=")
    if len(name) < 3 or not name.startswith("--") or name in long_options:
        return token
    matches = [option for option in _SOCKET_PROXYD_OPTIONS if option.startswith(name)]
    if len(matches) == 1:
        return matches[0] + equals + value
    return token


def _looks_like_value_of(option: str, word: str) -> bool:
    """Whether `word` after a bare `option` can only have been meant as its value."""
    if option == "--proxy-protocol":
        return _VERSION_WORD.fullmatch(word) is not None
    # IDLE,INTERVAL,PROBES, or a time span (`--keepalive 60s`): no target has a ','
    # outside a unix socket path, and a host name that is also a time span ("5m") can
    # be written with its port.
    if word[:1] in ("-", "/", "@", "[") or ":" in word:
        return False
    if "," in word:
        return True
    try:
        parse_timespan(word)
    except UsageError:
        return False
    return True
