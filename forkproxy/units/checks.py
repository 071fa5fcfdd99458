"""What forkproxy-units accepts: each flag's value and the combinations of flags.

Every check quotes what the user typed in its `ForkproxyError`; what forkproxy itself
would refuse is found by forkproxy's own parser (`forkproxy_config`), so a generated unit
never fails when systemd starts it. Never renders and never writes.
"""

import contextlib
import io
import os
import re
import socket

from forkproxy.errors import ForkproxyError
from forkproxy.settings.address import TargetAddress, parse_target
from forkproxy.settings.arguments import parse_args as parse_forkproxy_args
from forkproxy.settings.config import Config
from forkproxy.settings.kinds import DATAGRAM, SEQPACKET, STREAM, kind_mismatch
from forkproxy.units import listen
from forkproxy.units.listen import CONTROL
from forkproxy.units.request import PROG, UnitRequest

# forkproxy options that would fight the generated units, and what to use instead.
_OWNED_OPTIONS = (
    ("-l", "--listen", "use --listen-stream or --listen-unix"),
    ("", "--inetd", "use --accept"),
)
# forkproxy options that mean nothing to an Accept=yes instance, which relays its one
# connection in one process and exits (forkproxy/oneshot.py): the option, the Config
# field it sets, two values to probe for it (see _given), and why. --graceful-timeout
# does mean something: a stopped instance lets its connection finish for that long.
_NOT_PER_CONNECTION = (
    ("--connections-max", "connections_max", ("1000", "1001"),
     "use --max-connections (MaxConnections=), which caps the instances"),
    ("--workers", "workers", ("1", "2"), "an instance runs no workers"),
    ("--worker-timeout", "worker_timeout", ("100", "200"), "an instance runs no workers"),
    ("--exit-idle-time", "exit_idle_time", ("100", "200"),
     "an instance exits when its connection ends"),
    ("--on-limit", "on_limit", ("refuse", "queue"),
     "an instance has no cap to meet (--max-connections caps the instances)"),
    ("--connections-max-per-source", "connections_max_per_source", ("1", "2"),
     "an instance has one connection (MaxConnectionsPerSource= in the socket unit limits "
     "sources)"),
)  # fmt: skip

# What the system units' sandbox hides or makes private: socket file targets there.
PRIVATE_TMP = ("/tmp/", "/var/tmp/")
HOMES = ("/home/", "/root/", "/run/user/")

# unit_name_is_valid() in systemd's unit-name.c: these characters, 255 at most in all.
_UNIT_PREFIX = re.compile(r"[A-Za-z0-9:_.\\-]+")
_UNIT_NAME = re.compile(
    r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]+)?"
    r"\.(service|socket|target|device|mount|automount|swap|timer|path|slice|scope)"
)
_UNIT_NAME_MAX = 255
# valid_user_group_name() in its strict form, or a numeric id.
_USER_GROUP = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,30}|[0-9]{1,10}")
_EXECUTABLE = re.compile(r"(/[A-Za-z0-9_.+@:-]+)+")


def check_name(name: str) -> str:
    for suffix in (".socket", ".service"):
        if name.endswith(suffix):
            raise ForkproxyError(f"invalid unit name '{name}': give it without '{suffix}'")
    if "@" in name:
        raise ForkproxyError(
            f"invalid unit name '{name}': '@' is not allowed ({PROG} adds it with --accept)"
        )
    if not _UNIT_PREFIX.fullmatch(name):
        raise ForkproxyError(
            f"invalid unit name '{name}': use only letters, digits and ':', '-', '_', '.', '\\'"
        )
    return name


def check_target(target: str) -> str:
    if CONTROL.search(target):
        raise ForkproxyError(f"invalid target {target!r}: control characters are not allowed")
    parse_target(target)  # raises UsageError, a ForkproxyError, with the reason
    return target


def check_user_group(name: str | None, flag: str) -> str | None:
    if name is not None and not _USER_GROUP.fullmatch(name):
        raise ForkproxyError(
            f"invalid {flag} '{name}': a name of letters, digits, '_' and '-' "
            "(not starting with a digit or '-', at most 31) or a numeric id"
        )
    return name


def parse_mode(text: str) -> int:
    if not re.fullmatch(r"[0-7]{3,4}", text):
        raise ForkproxyError(f"invalid --socket-mode '{text}': expected octal, as in 0660")
    return int(text, 8)


def parse_count(text: str, flag: str, maximum: int) -> int:
    # The length first: int() refuses numbers of more than 4,300 digits with a ValueError.
    short = len(text) <= len(str(maximum))
    if not (short and text.isascii() and text.isdigit() and 1 <= int(text) <= maximum):
        raise ForkproxyError(f"invalid {flag} '{text}': expected an integer in 1-{maximum}")
    return int(text)


def check_target_unit(unit: str | None) -> str | None:
    if unit is not None and not (_UNIT_NAME.fullmatch(unit) and len(unit) <= _UNIT_NAME_MAX):
        raise ForkproxyError(
            f"invalid --target-unit '{unit}': expected a unit name such as nginx.service"
        )
    return unit


def check_description(text: str | None) -> str | None:
    if text is None:
        return None
    if not text.strip() or CONTROL.search(text) or text != text.strip() or text.endswith("\\"):
        raise ForkproxyError(
            f"invalid --description {text!r}: one line of text, no edge spaces or final '\\'"
        )
    return text


def check_executable(path: str | None) -> str | None:
    if path is not None and not _EXECUTABLE.fullmatch(path):
        raise ForkproxyError(
            f"invalid --executable '{path}': an absolute path of letters, digits and "
            "'_', '.', '+', '@', ':', '-'"
        )
    return path


def _has_option(args: tuple[str, ...], short: str, long: str) -> bool:
    """Whether forkproxy options name `long` (`--opt`, `--opt=V`) or `short` (`-x`, `-xV`)."""
    for arg in args:
        if arg == "--":
            return False
        if arg == long or arg.startswith(long + "="):
            return True
        if short and arg.startswith(short) and not arg.startswith("--"):
            return True
    return False


def forkproxy_config(request: UnitRequest) -> Config:
    """The `Config` forkproxy builds from ExecStart=, by forkproxy's own parser."""
    config = _parse_forkproxy([request.target, *request.forkproxy_args])
    for given, option, hint in (
        (config.listen, "--listen", "use --listen-stream or --listen-unix"),
        (config.inetd, "--inetd", "use --accept"),
        (config.metrics, "--metrics", f"give {PROG}'s --metrics before TARGET"),
    ):
        if given:
            raise ForkproxyError(
                f"forkproxy option '{option}' would bypass the socket unit: {hint}"
            )
    return config


def every_target(config: Config) -> tuple[TargetAddress, ...]:
    """The targets, then each named listener's (--route, a [listeners.NAME] section)."""
    return (
        *config.targets,
        *(target for settings in config.listeners for target in settings.targets),
    )


def _parse_forkproxy(argv: list[str]) -> Config:
    # argparse prints and exits for --help and --version; keep both out of our output.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return parse_forkproxy_args(argv)
        except ForkproxyError as error:
            raise ForkproxyError(f"forkproxy would not start: {error}") from None
        except SystemExit:
            raise ForkproxyError(
                "forkproxy would not start: --help and --version only print and exit"
            ) from None
        except ValueError as error:  # forkproxy would fail with a traceback: a bug there
            raise ForkproxyError(f"forkproxy would not start: {error}") from None


def _given(request: UnitRequest, option: str, field: str, probes: tuple[str, ...]) -> bool:
    """Whether forkproxy's parser finds `option` in the forkproxy options, in any spelling
    it takes: then the user's value wins over any value put before it."""
    argv = [request.target, *request.forkproxy_args]
    try:
        values = {getattr(_parse_forkproxy([f"{option}={p}", *argv]), field) for p in probes}
    except ForkproxyError:  # a probe value clashed with another option: look at the text
        return _has_option(request.forkproxy_args, "", option)
    return len(values) == 1


def check_combinations(r: UnitRequest) -> None:
    if not (r.listen_stream or r.listen_unix or r.listen_datagram or r.unix_paths):
        raise ForkproxyError(
            "nothing to listen on: give --listen-stream, --listen-unix, --listen-datagram, "
            "--listen-unix-datagram or --listen-sequential-packet"
        )
    _check_distinct(r)
    if r.accept and (r.listen_datagram or r.listen_unix_datagram or r.listen_sequential_packet):
        raise ForkproxyError(
            "--accept relays stream connections only: give datagram and sequential-packet "
            "sockets to a unit without --accept"
        )
    if r.max_connections is not None and not r.accept:
        raise ForkproxyError(
            "--max-connections needs --accept; without it, pass --connections-max=N "
            "to forkproxy after TARGET"
        )
    if r.accept and r.metrics is not None:
        raise ForkproxyError(
            "--metrics cannot be used with --accept: an instance serves one connection"
        )
    if r.share_namespace and r.target_unit is None:
        raise ForkproxyError("--share-namespace needs --target-unit: whose namespace to join")
    if r.user:
        if r.socket_user is not None or r.socket_group is not None:
            raise ForkproxyError(
                "--socket-user and --socket-group cannot be used with --user: "
                "a user manager cannot change socket ownership"
            )
        if r.share_namespace:
            raise ForkproxyError("--share-namespace cannot be used with --user")
    if not any(path.startswith("/") for path in r.unix_paths):
        for flag, value in (
            ("--socket-user", r.socket_user),
            ("--socket-group", r.socket_group),
            ("--socket-mode", r.socket_mode),
        ):
            if value is not None:
                raise ForkproxyError(
                    f"{flag} applies to socket files only: add --listen-unix /PATH"
                )
    for arg in r.forkproxy_args:
        if CONTROL.search(arg):
            raise ForkproxyError(f"forkproxy option {arg!r} contains a control character")
    for short, long, hint in _OWNED_OPTIONS:
        if _has_option(r.forkproxy_args, short, long):
            raise ForkproxyError(f"forkproxy option '{long}' would bypass the socket unit: {hint}")
    config = forkproxy_config(r)  # what forkproxy would refuse fails here, not in systemd
    _check_kinds(r, config)
    if r.accept:
        _check_per_connection(r, config)
    if not r.user:
        _check_reachable(config)
    longest = max((*r.socket_names, r.service_name), key=len)
    if len(longest) > _UNIT_NAME_MAX:
        raise ForkproxyError(f"unit name '{longest}' is longer than {_UNIT_NAME_MAX} characters")


def _check_distinct(r: UnitRequest) -> None:
    """Addresses the kernel would not let both be bound: the same IP address and port of
    one protocol (TCP, UDP), the same socket file whatever its type, the same abstract
    name of one type (unix(7): the abstract namespace is per socket type)."""
    files = [
        (flag, path)
        for flag, paths in (
            ("--listen-unix-datagram", r.listen_unix_datagram),
            ("--listen-sequential-packet", r.listen_sequential_packet),
        )
        for path in paths
        if path.startswith("/")
    ]
    listen.check_distinct(
        [("--listen-stream", address) for address in r.listen_stream]
        + [("--listen-unix", path) for path in r.listen_unix]
        + files
        + ([("--metrics", r.metrics)] if r.metrics is not None else [])
    )
    listen.check_distinct(
        [("--listen-datagram", address) for address in r.listen_datagram]
        + [("--listen-unix-datagram", path) for path in r.listen_unix_datagram]
    )
    listen.check_distinct(
        [("--listen-sequential-packet", path) for path in r.listen_sequential_packet]
    )


def _check_kinds(r: UnitRequest, config: Config) -> None:
    """Each socket's targets must take what it receives, as forkproxy checks at start."""
    given = [
        (flag, addresses[0], kind)
        for flag, addresses, kind in (
            ("--listen-stream", r.listen_stream, STREAM),
            ("--listen-unix", r.listen_unix, STREAM),
            ("--listen-datagram", r.listen_datagram, DATAGRAM),
            ("--listen-unix-datagram", r.listen_unix_datagram, DATAGRAM),
            ("--listen-sequential-packet", r.listen_sequential_packet, SEQPACKET),
        )
        if addresses
    ]
    first_flag, _, first_kind = given[0]
    for flag, _, kind in given[1:]:
        if kind != first_kind:
            raise ForkproxyError(
                f"{first_flag} and {flag} make sockets of different kinds, which cannot "
                "share their targets (systemd names every socket of a unit alike, so one "
                "--route would take them all): give each kind a unit of its own"
            )
    # Without FileDescriptorName=, systemd names every socket of the unit after it.
    targets = config.settings_for(f"{r.name}.socket").targets
    flag, address, kind = given[0]
    why = kind_mismatch(kind, targets)
    if why is not None:
        raise ForkproxyError(f"cannot relay {flag} {address}: {why}")


def socket_file_under(target: TargetAddress, directories: tuple[str, ...]) -> str | None:
    """The one of `directories` (each ending in '/') that holds a socket file target."""
    path = socket_file(target)
    if path is None:
        return None
    path = "/" + os.path.normpath(path).lstrip("/")
    return next((directory for directory in directories if path.startswith(directory)), None)


def socket_file(target: TargetAddress) -> str | None:
    """The path of a target that is a unix socket file (of any type), or None."""
    sockaddr = target.sockaddr
    if target.family == socket.AF_UNIX and isinstance(sockaddr, str) and sockaddr[:1] == "/":
        return sockaddr
    return None


def _check_reachable(config: Config) -> None:
    """A system unit's /tmp and /var/tmp are its own (PrivateTmp=, which DynamicUser=
    implies and nothing turns off): a socket file there cannot be reached."""
    for target in every_target(config):
        directory = socket_file_under(target, PRIVATE_TMP)
        if directory is not None:
            raise ForkproxyError(
                f"target '{target.text}' is in {directory}, which is private to the service "
                "(PrivateTmp=, implied by DynamicUser=yes): put the socket elsewhere, "
                "such as in /run"
            )


def _check_per_connection(r: UnitRequest, config: Config) -> None:
    """Refuse the forkproxy options an Accept=yes instance would ignore."""
    for option, field, probes, why in _NOT_PER_CONNECTION:
        if _given(r, option, field, probes):
            raise ForkproxyError(f"forkproxy option '{option}' means nothing with --accept: {why}")
    if config.listeners:
        raise ForkproxyError(
            "forkproxy option '--route' means nothing with --accept: an instance gets a "
            "connection, not a named listener (give the targets instead; nor do the "
            "[listeners.NAME] sections of a --config file apply)"
        )
