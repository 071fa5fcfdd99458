"""What forkproxy-units accepts: each flag's value and the combinations of flags.

Every check quotes what the user typed in its `ForkproxyError`; what forkproxy itself
would refuse is found by forkproxy's own parser (`forkproxy_config`), so a generated unit
never fails when systemd starts it. Never renders and never writes.
"""

import contextlib
import io
import ipaddress
import re

from forkproxy.errors import ForkproxyError
from forkproxy.settings.address import parse_target
from forkproxy.settings.arguments import parse_args as parse_forkproxy_args
from forkproxy.settings.config import Config
from forkproxy.settings.kinds import DATAGRAM, SEQPACKET, STREAM, kind_mismatch
from forkproxy.units.request import PROG, UnitRequest

# forkproxy options that would fight the generated units, and what to use instead.
_OWNED_OPTIONS = (
    ("-l", "--listen", "use --listen-stream or --listen-unix"),
    ("", "--inetd", "use --accept"),
)

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
_PORT = re.compile(r"[1-9][0-9]{0,4}")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path less its NUL (or an abstract name's leading NUL)
_UNIX_FLAG_OF = {"--listen-datagram": "--listen-unix-datagram"}


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


def check_inet(address: str, flag: str) -> str:
    """ListenStream= syntax for IP (systemd.socket(5)): PORT, IPV4:PORT or [IPV6]:PORT."""
    if address[:1] in ("/", "@"):
        unix_flag = _UNIX_FLAG_OF.get(flag, "--listen-unix")
        raise ForkproxyError(f"invalid {flag} '{address}': use {unix_flag} for unix sockets")
    if address.startswith("["):
        literal, _, port = address[1:].partition("]:")
        if not port or "%" in literal or not _is_ip(literal, 6):
            raise ForkproxyError(
                f"invalid {flag} '{address}': expected [IPV6]:PORT, as in '[::1]:8080'"
            )
    elif ":" in address:
        host, _, port = address.rpartition(":")
        if not _is_ip(host, 4):
            raise ForkproxyError(
                f"invalid {flag} '{address}': '{host}' is not an IPv4 address "
                "(write PORT, IPV4:PORT or [IPV6]:PORT)"
            )
    else:
        port = address
    if not (_PORT.fullmatch(port) and int(port) <= 65535):
        raise ForkproxyError(
            f"invalid {flag} '{address}': port '{port}' is not a number in 1-65535"
        )
    return address


def _is_ip(text: str, version: int) -> bool:
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return False
    return parsed.version == version


def check_unix(path: str, flag: str) -> str:
    if not path.startswith(("/", "@")):
        raise ForkproxyError(f"invalid {flag} '{path}': give an absolute /path or an @name")
    if CONTROL.search(path) or path != path.strip() or path.endswith("\\"):
        raise ForkproxyError(
            f"invalid {flag} {path!r}: no control characters, edge spaces or final '\\'"
        )
    if path in ("/", "@"):
        raise ForkproxyError(f"invalid {flag} '{path}': no socket name after '{path}'")
    if len(path.encode()) - (1 if path.startswith("@") else 0) > _SUN_PATH_MAX:
        raise ForkproxyError(f"invalid {flag} '{path}': longer than {_SUN_PATH_MAX} bytes")
    return path


def check_metrics(address: str | None) -> str | None:
    if address is None:
        return None
    if address[:1] in ("/", "@"):
        return check_unix(address, "--metrics")
    return check_inet(address, "--metrics")


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
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= maximum):
        raise ForkproxyError(f"invalid {flag} '{text}': expected an integer in 1-{maximum}")
    return int(text)


def check_target_unit(unit: str | None) -> str | None:
    if unit is not None and not (_UNIT_NAME.fullmatch(unit) and len(unit) <= _UNIT_NAME_MAX):
        raise ForkproxyError(
            f"invalid --upstream-unit '{unit}': expected a unit name such as nginx.service"
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
    argv = [*request.forkproxy_args, request.target]
    # argparse prints and exits for --help and --version; keep both out of our output.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            config = parse_forkproxy_args(argv)
        except ForkproxyError as error:
            raise ForkproxyError(f"forkproxy would not start: {error}") from None
        except SystemExit:
            raise ForkproxyError(
                "forkproxy would not start: --help and --version only print and exit"
            ) from None
    if config.listen:
        raise ForkproxyError(
            "forkproxy option '--listen' would bypass the socket unit: "
            "use --listen-stream or --listen-unix"
        )
    return config


def _check_kinds(r: UnitRequest, config: Config) -> None:
    """Each socket's targets must take what it receives, as forkproxy checks at start."""
    # Without FileDescriptorName=, systemd names every socket of the unit after it.
    routes = {route.name: route.targets for route in config.routes}
    targets = routes.get(f"{r.name}.socket", config.targets)
    for flag, addresses, kind in (
        ("--listen-stream", r.listen_stream, STREAM),
        ("--listen-unix", r.listen_unix, STREAM),
        ("--listen-datagram", r.listen_datagram, DATAGRAM),
        ("--listen-unix-datagram", r.listen_unix_datagram, DATAGRAM),
        ("--listen-sequential-packet", r.listen_sequential_packet, SEQPACKET),
    ):
        why = kind_mismatch(kind, targets) if addresses else None
        if why is not None:
            raise ForkproxyError(f"cannot relay {flag} {addresses[0]}: {why}")


def check_combinations(r: UnitRequest) -> None:
    if not (r.listen_stream or r.listen_unix or r.listen_datagram or r.unix_paths):
        raise ForkproxyError(
            "nothing to listen on: give --listen-stream, --listen-unix, --listen-datagram, "
            "--listen-unix-datagram or --listen-sequential-packet"
        )
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
    if r.accept and _has_option(r.forkproxy_args, "-c", "--connections-max"):
        raise ForkproxyError(
            "forkproxy option --connections-max has no effect with --accept "
            "(one connection per instance): use --max-connections"
        )
    if r.share_namespace and r.target_unit is None:
        raise ForkproxyError("--share-namespace needs --upstream-unit: whose namespace to join")
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
    config = forkproxy_config(r)  # what forkproxy would refuse fails here, not at start
    _check_kinds(r, config)
    longest = max((*r.socket_names, r.service_name), key=len)
    if len(longest) > _UNIT_NAME_MAX:
        raise ForkproxyError(f"unit name '{longest}' is longer than {_UNIT_NAME_MAX} characters")
