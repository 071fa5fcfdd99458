"""The relay options' part of the command line, for `arguments`.

Their argparse definitions with help text, and the getopt-style optional values of
`-p/--proxy-protocol[=v1|v2]` and `--keepalive[=IDLE,INTERVAL,PROBES]`. Their values
are read by option_values.py. Part of `arguments`: never touches sockets or processes.
"""

import argparse

from forkproxy.settings.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_NODELAY,
    DEFAULT_PIPE_SIZE,
)
from forkproxy.settings.option_values import BARE_KEEPALIVE
from forkproxy.settings.options import format_size
from forkproxy.settings.timespan import format_timespan

# What a bare -p/--proxy-protocol or --keepalive stands for.
_BARE = {"--proxy-protocol": "v1", "--keepalive": BARE_KEEPALIVE}
# The same by dest: what `true` stands for in a configuration file.
BARE_VALUES = {option[2:].replace("-", "_"): text for option, text in _BARE.items()}
# systemd-socket-proxyd's own long options: a prefix of one of them that our added options
# made ambiguous (--conn: --connections-max or --connect-timeout?) still means it, so
# unit files written for it keep working.
_SOCKET_PROXYD_OPTIONS = ("--connections-max", "--exit-idle-time", "--help", "--version")


def add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the relay options on `parser`."""
    parser.add_argument(
        "-p",
        "--proxy-protocol",
        metavar="VERSION",
        help="send a PROXY protocol header (v1 text or v2 binary) with the client's address "
        "first on every upstream connection; -p alone means v1",
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
        "INTERVAL, drop after PROBES unanswered; alone: the kernel's timings",
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


def attach_optional_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """argv with every optional value attached, as getopt_long's optional_argument reads.

    `-p` and `--proxy-protocol`/`--keepalive` (or an unambiguous prefix) without `=VALUE`
    become `--option=VALUE` with the next word when it can only be that option's value
    (`-p v2`, `--keepalive 60s,10s,6`), else with the bare meaning, so a target after
    them is never taken for their value. `-pv2` is `--proxy-protocol=v2`. A prefix of a
    systemd-socket-proxyd option is spelled out (see _SOCKET_PROXYD_OPTIONS).
    """
    long_options = [text for text in parser._option_string_actions if text.startswith("--")]
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
        option = "--proxy-protocol" if token == "-p" else _long_option(token, long_options)
        if option not in _BARE:
            result.append(token)
            continue
        following = argv[index] if index < len(argv) else None
        if following is not None and _is_value_of(option, following):
            result.append(f"{option}={following}")
            index += 1
        else:
            result.append(f"{option}={_BARE[option]}")
    return result


def _long_option(token: str, long_options: list[str]) -> str | None:
    if not token.startswith("--") or "=" in token or token == "--":
        return None
    if token in long_options:
        return token
    matches = [option for option in long_options if option.startswith(token)]
    return matches[0] if len(matches) == 1 else None


def _socket_proxyd_prefix(token: str, long_options: list[str]) -> str:
    name, equals, value = token.partition("=")
    if not name.startswith("--") or name == "--" or name in long_options:
        return token
    matches = [option for option in long_options if option.startswith(name)]
    ours = [option for option in matches if option in _SOCKET_PROXYD_OPTIONS]
    if len(matches) > 1 and len(ours) == 1:
        return ours[0] + equals + value
    return token


def _is_value_of(option: str, word: str) -> bool:
    if option == "--proxy-protocol":
        return word.strip().lower() in ("v1", "v2")
    # No target has a ',' outside a unix socket path, and every other target has a ':'.
    return "," in word and ":" not in word and word[:1] not in ("-", "/", "@")
