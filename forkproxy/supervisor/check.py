"""`forkproxy --check`: the settings checked as far as they can be without serving.

Parsing has checked every value already. This adds what needs the world, as the master
would meet it: the listeners (the sockets systemd passed, by LISTEN_FDNAMES, else the
--listen addresses, parsed and not bound) against the names the settings give routes
for; a target for every listener, of the kind the listener takes (`kind_problems`);
host-name targets resolved (getaddrinfo(3)); pipes of each --pipe-size in use. The
answer is one line per route, listener -> targets, with the relay options that differ
from the defaults, or every problem found (`UsageErrors`). A reload's check (reload.py)
gets one line more, about the code that ran it. `listener_problems` (with
`kind_problems`) is the master's check too, with the descriptor limit and pipe sizes
(`check_settings_for`). Never binds, adopts a passed socket, forks
or prints (`cli` prints).
"""

import dataclasses
import os
import socket
from collections.abc import Mapping, Sequence

from forkproxy import __version__
from forkproxy.errors import ForkproxyError, UsageErrors
from forkproxy.relay.access_log import access_log_problems, check_access_logs
from forkproxy.relay.engine import engine_name
from forkproxy.relay.splice import check_pipe_size
from forkproxy.settings.address import TargetAddress, format_sockaddr
from forkproxy.settings.config import RELAY_OPTIONS, Config, ListenerSettings
from forkproxy.settings.kinds import kind_mismatch
from forkproxy.settings.option_values import VALUES
from forkproxy.settings.options import KeepAlive
from forkproxy.shared.layout import LAYOUT_VERSION
from forkproxy.shared.listener import is_connection
from forkproxy.supervisor.activation import METRICS_FD_NAME, passed_fds
from forkproxy.supervisor.limits import check_fd_limit
from forkproxy.supervisor.reexec_state import CHECK_VARIABLE, check_marker
from forkproxy.supervisor.target_rows import pair_problems

# (name, label, kind): a listener as the routes see it (name "" if it has none) and its
# socket type (SO_TYPE).
ListenerKind = tuple[str, str, int]

_DEFAULTS = {
    field.name: field.default
    for field in dataclasses.fields(ListenerSettings)
    if field.name in RELAY_OPTIONS
}


def check_settings(config: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """The route lines of `config`, or UsageErrors with every problem found."""
    problems: list[str] = []
    environ = os.environ if environ is None else environ
    listeners = _listeners(config, environ, problems)
    if listeners:
        problems += listener_problems(config, listeners)
    problems += _resolve_targets(config)
    problems += access_log_problems(config)
    for size in sorted({settings.pipe_size for settings in _all_settings(config)}):
        try:
            check_pipe_size(size)
        except ForkproxyError as error:
            problems.append(str(error))
    if problems:
        raise UsageErrors(problems)
    if listeners:
        lines = [_route_line(label, config.settings_for(name)) for name, label, _ in listeners]
    else:
        # No socket passed and no --listen: the routes by name, as systemd will name them.
        lines = [_route_line(f"'{settings.name}'", settings) for settings in config.listeners]
        if config.targets:
            others = "other listeners" if config.listeners else "every listener"
            lines.append(_route_line(others, config.global_settings()))
    if environ.get(CHECK_VARIABLE) == "1":
        lines.append(check_marker(__version__, LAYOUT_VERSION, engine_name()))
    return lines


def listener_problems(config: Config, listeners: Sequence[ListenerKind]) -> list[str]:
    """Settings for a listener that does not exist, listeners left without a target, and
    listeners whose targets cannot take what they receive (`kind_problems`)."""
    problems = []
    names = {name for name, _, _ in listeners if name}
    known = ", ".join(f"'{name}'" for name in sorted(names)) or "none"
    for settings in config.listeners:
        if settings.name not in names:
            problems.append(
                f"{settings.origin or settings.name}: no listening socket is named "
                f"'{settings.name}' (named: {known}; name them with FileDescriptorName= or "
                "--listen NAME=ADDR)"
            )
    if not config.targets:
        for name, label, _ in listeners:
            if not config.settings_for(name).targets:
                problems.append(
                    f"{label}: no target for this listener: give targets (or a "
                    "[listeners.NAME] section naming it) in the configuration file, or as "
                    "arguments"
                )
    problems += pair_problems(config, [name or label for name, label, _ in listeners])
    return problems + kind_problems(config, listeners)


def kind_problems(config: Config, listeners: Sequence[ListenerKind]) -> list[str]:
    """Listeners whose targets cannot take what they receive (a datagram listener with a
    TCP target, ...)."""
    problems = []
    for name, label, kind in listeners:
        settings = config.settings_for(name)
        why = kind_mismatch(kind, settings.targets + settings.backup)
        if why is None and settings.accept_proxy and kind != socket.SOCK_STREAM:
            why = "--accept-proxy needs a stream listener (a PROXY header starts a stream)"
        if why is not None:
            where = f" ({settings.origin})" if settings.origin else ""
            problems.append(f"cannot relay listener {label}{where}: {why}")
    return problems


def _listeners(
    config: Config, environ: Mapping[str, str], problems: list[str]
) -> list[ListenerKind]:
    """The listeners a master would have: passed sockets, else --listen addresses."""
    passed = [(fd, name) for fd, name in passed_fds(dict(environ)) if name != METRICS_FD_NAME]
    if not passed:
        # As written, without the name: "8080", not the [::]:8080 it binds.
        return [
            (
                address.name,
                _label(address.name, address.text.removeprefix(f"{address.name}=")),
                address.kind,
            )
            for address in config.listen
        ]
    listeners = []
    for fd, name in passed:
        name = "" if name == "unknown" else name
        try:
            sock = socket.socket(fileno=fd)
        except OSError as error:
            problems.append(f"fd {fd} from systemd is not a socket: {error.strerror}")
            continue
        try:
            where = format_sockaddr(sock.family, sock.getsockname())
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        except OSError:
            where, listening, kind = "?", 0, socket.SOCK_STREAM
        finally:
            sock.detach()  # only looked at it: it stays systemd's
        if not listening and kind != socket.SOCK_DGRAM and not is_connection(fd):
            problems.append(f"fd {fd} from systemd is not a listening stream socket")
        listeners.append((name, f"fd {fd} " + _label(name, where), kind))
    return listeners


def _label(name: str, where: str) -> str:
    return f"'{name}' {where}" if name else where


def _all_settings(config: Config) -> list[ListenerSettings]:
    return [config.global_settings(), *config.listeners]


def _resolve_targets(config: Config) -> list[str]:
    """An error for each host-name target getaddrinfo(3) cannot resolve now."""
    problems = []
    seen: set[TargetAddress] = set()
    for settings in _all_settings(config):
        for target in settings.targets + settings.backup:
            if target in seen or not (target.needs_resolving or "%" in target.host):
                continue
            seen.add(target)
            host = target.host.strip("[]")
            try:
                socket.getaddrinfo(host, target.port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as error:
                reason = getattr(error, "strerror", None) or error
                problems.append(f"cannot resolve target '{target.text}': {reason}")
    return problems


def _route_line(listener: str, settings: ListenerSettings) -> str:
    targets = ", ".join(target.text for target in settings.targets) or "(no target)"
    options = [
        f"{dest.replace('_', '-')}={_format(dest, value)}"
        for dest, value in settings.relay_options().items()
        if value != _DEFAULTS[dest]
    ]
    return f"{listener} -> {targets}" + (f"  ({', '.join(options)})" if options else "")


def _format(dest: str, value: object) -> str:
    if isinstance(value, bool) or value == KeepAlive():
        return "true" if value else "false"
    if isinstance(value, tuple):  # a repeatable option's values (--backup, ...)
        return ",".join(VALUES[dest].format(item) for item in value)
    return VALUES[dest].format(value)


def check_settings_for(config: Config, listeners: list[ListenerKind], fd_limit: int) -> None:
    """What can only be checked with the listeners ((name, label, kind) each) and the
    kernel at hand: a route of the right kind for every listener, the pipe sizes, the
    descriptor limit, the access-log files (each worker opens them: can it?). Raises
    ForkproxyError."""
    check_fd_limit(fd_limit, config.connections_max)
    check_access_logs(config)
    problems = listener_problems(config, listeners)
    if problems:
        raise UsageErrors(problems)
    for size in {config.settings_for(name).pipe_size for name, _, _ in listeners}:
        check_pipe_size(size)
