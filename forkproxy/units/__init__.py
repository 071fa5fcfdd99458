"""systemd unit files for forkproxy, rendered from a command line (`forkproxy-units`).

`forkproxy-units NAME [FLAGS...] [--] TARGET [FORKPROXY-OPTIONS...]` becomes a hardened
NAME.socket + NAME.service pair (NAME@.service with --accept, plus NAME-metrics.socket with
--metrics), printed or written to a directory. This is the one definition of forkproxy's
units: the files in systemd/ are its output. Never talks to systemd (no systemctl, no D-Bus)
and never starts forkproxy.
"""

import contextlib
import io
import ipaddress
import math
import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass

from forkproxy import __version__, cli
from forkproxy.errors import ForkproxyError
from forkproxy.settings.address import parse_upstream
from forkproxy.settings.config import Config

PROG = "forkproxy-units"
SYSTEM_EXECUTABLE = "/usr/local/bin/forkproxy"  # where `pip install forkproxy` as root puts it
USER_EXECUTABLE = "%h/.local/bin/forkproxy"  # `pip install --user` or pipx; %h is $HOME

# A relayed connection holds up to 6 fds (client, upstream, two splice pipes in flight);
# the spare is the master's FD_RESERVE: 64 pooled pipes, listeners, the event loop.
FDS_PER_CONNECTION = 6
FDS_SPARE = 160
# The master pings the watchdog while workers' heartbeats are fresh, and pings every half
# WatchdogSec=; three worker timeouts leave it time to replace a stuck worker first.
WATCHDOG_PER_WORKER_TIMEOUT = 3

USAGE = f"""\
usage: {PROG} NAME [FLAGS...] [--] TARGET [FORKPROXY-OPTIONS...]

Generate NAME.socket and NAME.service (NAME@.service with --accept) that run
`forkproxy TARGET` under socket activation. FORKPROXY-OPTIONS go to ExecStart=
as given, e.g. --connections-max=1024 --exit-idle-time=5min.

flags:
  --listen-stream ADDR   listen on PORT, IPV4:PORT or [IPV6]:PORT (repeatable)
  --listen-unix PATH     listen on a unix socket, /path or @abstract (repeatable)
  --socket-user USER     owner of the unix socket files (SocketUser=)
  --socket-group GROUP   group of the unix socket files (SocketGroup=)
  --socket-mode MODE     octal access mode of the unix socket files (SocketMode=)
  --backlog N            queue of connections not yet accepted (Backlog=)
  --accept               one forkproxy per connection (Accept=yes, NAME@.service)
  --max-connections N    with --accept: instances at once (MaxConnections=)
  --metrics ADDR         serve Prometheus metrics on ADDR (NAME-metrics.socket)
  --upstream-unit UNIT   the unit serving TARGET, started first (Requires=, After=)
  --share-namespace      run in UNIT's network namespace (JoinsNamespaceOf=)
  --description TEXT     Description= of the units
  --executable PATH      forkproxy's absolute path (default {SYSTEM_EXECUTABLE},
                         with --user {USER_EXECUTABLE})
  --user                 units for a user manager (systemctl --user)
  --output-dir DIR       write the files to DIR (default: print them; a dry run)
  --force                with --output-dir: replace existing files
  -h, --help             show this help and exit
  --version              show the version and exit
"""

_VALUE_FLAGS = frozenset({
    "--listen-stream", "--listen-unix", "--socket-user", "--socket-group", "--socket-mode",
    "--backlog", "--max-connections", "--metrics", "--upstream-unit", "--description",
    "--executable", "--output-dir",
})  # fmt: skip
_REPEATABLE = frozenset({"--listen-stream", "--listen-unix"})
_SWITCHES = frozenset({"--accept", "--share-namespace", "--user", "--force"})
_INFO_FLAGS = frozenset({"-h", "--help", "--version"})
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
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# ExecStart= words that need no quotes once '%' and '$' are doubled.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%$+=:,./\[\]-]+")
_C_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path less its NUL (or an abstract name's leading NUL)


@dataclass(frozen=True, slots=True)
class UnitRequest:
    """Everything the units are rendered from, validated."""

    name: str
    target: str
    forkproxy_args: tuple[str, ...] = ()
    listen_stream: tuple[str, ...] = ()
    listen_unix: tuple[str, ...] = ()
    socket_user: str | None = None
    socket_group: str | None = None
    socket_mode: int | None = None
    backlog: int | None = None
    accept: bool = False
    max_connections: int | None = None
    metrics: str | None = None
    upstream_unit: str | None = None
    share_namespace: bool = False
    description: str | None = None
    executable: str | None = None
    user: bool = False

    @property
    def service_name(self) -> str:
        return f"{self.name}@.service" if self.accept else f"{self.name}.service"

    @property
    def socket_names(self) -> tuple[str, ...]:
        metrics = (f"{self.name}-metrics.socket",) if self.metrics is not None else ()
        return (f"{self.name}.socket", *metrics)


@dataclass(frozen=True, slots=True)
class Output:
    directory: str | None = None
    force: bool = False


# ---- command line -----------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[UnitRequest, Output]:
    """A command line (without the program name) to what to render and where to put it."""
    values, positional, rest = _split(argv)
    if not positional:
        raise ForkproxyError(f"missing unit NAME (see '{PROG} --help')")
    if len(positional) < 2:
        raise ForkproxyError("missing TARGET: give HOST:PORT or a unix socket path")
    request = _build_request(positional[0], positional[1], tuple(rest), values)
    output = Output(_one(values, "--output-dir"), "--force" in values)
    if output.force and output.directory is None:
        raise ForkproxyError("--force needs --output-dir")
    return request, output


def _split(argv: list[str]) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Flags (name to values), NAME and TARGET, and the forkproxy options after TARGET."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise ForkproxyError(f"argument {arg!r} is not valid UTF-8") from None
    values: dict[str, list[str]] = {}
    positional: list[str] = []
    i = 0
    while i < len(argv) and len(positional) < 2:
        arg = argv[i]
        i += 1
        if arg == "--":
            if not positional:
                raise ForkproxyError("missing unit NAME before '--'")
            positional.extend(argv[i : i + 1])
            i += 1
        elif not arg.startswith("-") or arg == "-":
            positional.append(arg)
        else:
            flag, has_value, value = arg.partition("=")
            if flag in _SWITCHES or flag in _INFO_FLAGS:
                if has_value:
                    raise ForkproxyError(f"option '{flag}' takes no value")
            elif flag in _VALUE_FLAGS:
                if not has_value:
                    if i == len(argv):
                        raise ForkproxyError(f"option '{flag}' needs a value")
                    value = argv[i]
                    i += 1
            else:
                raise ForkproxyError(
                    f"unknown option '{flag}' (forkproxy's own options go after TARGET)"
                )
            values.setdefault(flag, []).append(value)
    for flag, given in values.items():
        if len(given) > 1 and flag not in _REPEATABLE:
            raise ForkproxyError(f"option '{flag}' given more than once")
    for arg in argv[i:]:
        flag = arg.partition("=")[0]
        if flag in _VALUE_FLAGS or flag in _SWITCHES:
            raise ForkproxyError(
                f"option '{flag}' after TARGET would go to forkproxy: give the {PROG} "
                "flags before TARGET"
            )
    return values, positional, argv[i:]


def canonical_args(request: UnitRequest) -> list[str]:
    """The command line that renders `request`, flags in a fixed order."""
    r = request
    args = [r.name]
    args += [word for address in r.listen_stream for word in ("--listen-stream", address)]
    args += [word for path in r.listen_unix for word in ("--listen-unix", path)]
    mode = None if r.socket_mode is None else f"{r.socket_mode:04o}"
    for flag, value in (
        ("--socket-user", r.socket_user),
        ("--socket-group", r.socket_group),
        ("--socket-mode", mode),
        ("--backlog", r.backlog),
        ("--accept", r.accept),
        ("--max-connections", r.max_connections),
        ("--metrics", r.metrics),
        ("--upstream-unit", r.upstream_unit),
        ("--share-namespace", r.share_namespace),
        ("--description", r.description),
        ("--executable", r.executable),
        ("--user", r.user),
    ):
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return [*args, "--", r.target, *r.forkproxy_args]


def _one(values: dict[str, list[str]], flag: str) -> str | None:
    given = values.get(flag)
    return given[0] if given else None


def _build_request(
    name: str, target: str, forkproxy_args: tuple[str, ...], values: dict[str, list[str]]
) -> UnitRequest:
    def number(flag: str) -> int | None:
        text = _one(values, flag)
        return None if text is None else _parse_count(text, flag, 2**32 - 1)

    mode = _one(values, "--socket-mode")
    streams = values.get("--listen-stream", [])
    unix_paths = values.get("--listen-unix", [])
    request = UnitRequest(
        name=_check_name(name),
        target=_check_target(target),
        forkproxy_args=forkproxy_args,
        listen_stream=tuple(_check_inet(address, "--listen-stream") for address in streams),
        listen_unix=tuple(_check_unix(path, "--listen-unix") for path in unix_paths),
        socket_user=_check_user_group(_one(values, "--socket-user"), "--socket-user"),
        socket_group=_check_user_group(_one(values, "--socket-group"), "--socket-group"),
        socket_mode=None if mode is None else _parse_mode(mode),
        backlog=number("--backlog"),
        accept="--accept" in values,
        max_connections=number("--max-connections"),
        metrics=_check_metrics(_one(values, "--metrics")),
        upstream_unit=_check_upstream_unit(_one(values, "--upstream-unit")),
        share_namespace="--share-namespace" in values,
        description=_check_description(_one(values, "--description")),
        executable=_check_executable(_one(values, "--executable")),
        user="--user" in values,
    )  # fmt: skip
    _check_combinations(request)
    return request


# ---- validation -------------------------------------------------------------------------


def _check_name(name: str) -> str:
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


def _check_target(target: str) -> str:
    if _CONTROL.search(target):
        raise ForkproxyError(f"invalid target {target!r}: control characters are not allowed")
    parse_upstream(target)  # raises UsageError, a ForkproxyError, with the reason
    return target


def _check_inet(address: str, flag: str) -> str:
    """ListenStream= syntax for IP (systemd.socket(5)): PORT, IPV4:PORT or [IPV6]:PORT."""
    if address[:1] in ("/", "@"):
        raise ForkproxyError(f"invalid {flag} '{address}': use --listen-unix for unix sockets")
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


def _check_unix(path: str, flag: str) -> str:
    if not path.startswith(("/", "@")):
        raise ForkproxyError(f"invalid {flag} '{path}': give an absolute /path or an @name")
    if _CONTROL.search(path) or path != path.strip() or path.endswith("\\"):
        raise ForkproxyError(
            f"invalid {flag} {path!r}: no control characters, edge spaces or final '\\'"
        )
    if path in ("/", "@"):
        raise ForkproxyError(f"invalid {flag} '{path}': no socket name after '{path}'")
    if len(path.encode()) - (1 if path.startswith("@") else 0) > _SUN_PATH_MAX:
        raise ForkproxyError(f"invalid {flag} '{path}': longer than {_SUN_PATH_MAX} bytes")
    return path


def _check_metrics(address: str | None) -> str | None:
    if address is None:
        return None
    if address[:1] in ("/", "@"):
        return _check_unix(address, "--metrics")
    return _check_inet(address, "--metrics")


def _check_user_group(name: str | None, flag: str) -> str | None:
    if name is not None and not _USER_GROUP.fullmatch(name):
        raise ForkproxyError(
            f"invalid {flag} '{name}': a name of letters, digits, '_' and '-' "
            "(not starting with a digit or '-', at most 31) or a numeric id"
        )
    return name


def _parse_mode(text: str) -> int:
    if not re.fullmatch(r"[0-7]{3,4}", text):
        raise ForkproxyError(f"invalid --socket-mode '{text}': expected octal, as in 0660")
    return int(text, 8)


def _parse_count(text: str, flag: str, maximum: int) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= maximum):
        raise ForkproxyError(f"invalid {flag} '{text}': expected an integer in 1-{maximum}")
    return int(text)


def _check_upstream_unit(unit: str | None) -> str | None:
    if unit is not None and not (_UNIT_NAME.fullmatch(unit) and len(unit) <= _UNIT_NAME_MAX):
        raise ForkproxyError(
            f"invalid --upstream-unit '{unit}': expected a unit name such as nginx.service"
        )
    return unit


def _check_description(text: str | None) -> str | None:
    if text is None:
        return None
    if not text.strip() or _CONTROL.search(text) or text != text.strip() or text.endswith("\\"):
        raise ForkproxyError(
            f"invalid --description {text!r}: one line of text, no edge spaces or final '\\'"
        )
    return text


def _check_executable(path: str | None) -> str | None:
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
            config = cli.parse_args(argv)
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


def _check_combinations(r: UnitRequest) -> None:
    if not r.listen_stream and not r.listen_unix:
        raise ForkproxyError("nothing to listen on: give --listen-stream or --listen-unix")
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
    if r.share_namespace and r.upstream_unit is None:
        raise ForkproxyError("--share-namespace needs --upstream-unit: whose namespace to join")
    if r.user:
        if r.socket_user is not None or r.socket_group is not None:
            raise ForkproxyError(
                "--socket-user and --socket-group cannot be used with --user: "
                "a user manager cannot change socket ownership"
            )
        if r.share_namespace:
            raise ForkproxyError("--share-namespace cannot be used with --user")
    if not any(path.startswith("/") for path in r.listen_unix):
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
        if _CONTROL.search(arg):
            raise ForkproxyError(f"forkproxy option {arg!r} contains a control character")
    for short, long, hint in _OWNED_OPTIONS:
        if _has_option(r.forkproxy_args, short, long):
            raise ForkproxyError(f"forkproxy option '{long}' would bypass the socket unit: {hint}")
    forkproxy_config(r)  # what forkproxy would refuse fails here, not when systemd starts it
    longest = max((*r.socket_names, r.service_name), key=len)
    if len(longest) > _UNIT_NAME_MAX:
        raise ForkproxyError(f"unit name '{longest}' is longer than {_UNIT_NAME_MAX} characters")


# ---- rendering --------------------------------------------------------------------------


def quote_exec_arg(arg: str) -> str:
    """One ExecStart= argument that systemd reads back as `arg` (systemd.service(5),
    "Command lines"): '%' and '$' doubled, anything else special in double quotes with
    C escapes."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN_WORD.fullmatch(arg):
        return escaped
    quoted = "".join(_C_ESCAPES.get(c) or _hex_escape(c) for c in escaped)
    return f'"{quoted}"'


def _hex_escape(c: str) -> str:
    return f"\\x{ord(c):02x}" if _CONTROL.match(c) else c


def exec_start(request: UnitRequest) -> str:
    """The ExecStart= value: forkproxy, its options, then the target (forkproxy(1) order)."""
    executable = request.executable or (USER_EXECUTABLE if request.user else SYSTEM_EXECUTABLE)
    words = [*request.forkproxy_args, request.target]
    return " ".join([executable, *(quote_exec_arg(word) for word in words)])


def limit_nofile(config: Config) -> int:
    """Open files for the whole connection cap in one worker, rounded up to 1024s."""
    needed = FDS_PER_CONNECTION * config.connections_max + FDS_SPARE
    return math.ceil(needed / 1024) * 1024


def watchdog_sec(config: Config) -> int | None:
    """WatchdogSec= in whole seconds, or None when workers are never timed out."""
    if math.isinf(config.worker_timeout):
        return None
    return math.ceil(WATCHDOG_PER_WORKER_TIMEOUT * config.worker_timeout)


def render(request: UnitRequest) -> dict[str, str]:
    """File name to unit text, sockets first."""
    files = {f"{request.name}.socket": _socket_unit(request)}
    if request.metrics is not None:
        files[f"{request.name}-metrics.socket"] = _metrics_socket_unit(request)
    files[request.service_name] = _service_unit(request)
    return files


def _specifiers(text: str) -> str:
    return text.replace("%", "%%")


def _description(r: UnitRequest) -> str:
    return _specifiers(r.description or f"forkproxy relay to {r.target}")


def _header(filename: str, purpose: str, r: UnitRequest) -> list[str]:
    return [
        f"# {filename}: {purpose}",
        f"# Generated by {PROG}; regenerate with:",
        "#   " + shlex.join([PROG, *canonical_args(r)]),
    ]


def _socket_unit(r: UnitRequest) -> str:
    if r.accept:
        purpose = f"starts an instance of {r.service_name} for each connection."
    else:
        purpose = f"starts {r.service_name} on the first connection."
    lines = [*_header(f"{r.name}.socket", purpose, r), "[Unit]"]
    lines += [f"Description={_description(r)} (socket)", "", "[Socket]"]
    lines += [f"ListenStream={_specifiers(address)}" for address in r.listen_stream]
    lines += [f"ListenStream={_specifiers(path)}" for path in r.listen_unix]
    if r.socket_user is not None:
        lines.append(f"SocketUser={r.socket_user}")
    if r.socket_group is not None:
        lines.append(f"SocketGroup={r.socket_group}")
    if r.socket_mode is not None:
        lines.append(f"SocketMode={r.socket_mode:04o}")
    if r.backlog is not None:
        lines.append(f"Backlog={r.backlog}")
    if r.accept:
        lines.append("Accept=yes")
    if r.max_connections is not None:
        lines.append(f"MaxConnections={r.max_connections}")
    return _join(lines + _INSTALL)


def _metrics_socket_unit(r: UnitRequest) -> str:
    assert r.metrics is not None
    filename = f"{r.name}-metrics.socket"
    purpose = f"the metrics socket of {r.service_name} (fd name 'metrics')."
    lines = [*_header(filename, purpose, r), "[Unit]"]
    lines += [f"Description={_description(r)} (metrics socket)", "", "[Socket]"]
    lines += [f"ListenStream={_specifiers(r.metrics)}", "FileDescriptorName=metrics"]
    lines.append(f"Service={r.service_name}")
    return _join(lines + _INSTALL)


_INSTALL = ["", "[Install]", "WantedBy=sockets.target"]


def _service_unit(r: UnitRequest) -> str:
    if r.accept:
        purpose = f"forkproxy relaying one connection of {r.name}.socket to {r.target}."
    else:
        purpose = f"forkproxy relaying {r.name}.socket to {r.target}."
    lines = [*_header(r.service_name, purpose, r), "[Unit]"]
    if r.accept:
        lines += [
            f"Description={_description(r)} (connection %i)",
            "# Clean up failed instances too, so that they do not pile up.",
            "CollectMode=inactive-or-failed",
        ]
    else:
        lines.append(f"Description={_description(r)}")
        for name in r.socket_names:
            lines += [f"Requires={name}", f"After={name}"]
    if r.upstream_unit is not None:
        lines += [f"Requires={r.upstream_unit}", f"After={r.upstream_unit}"]
    if r.share_namespace:
        lines.append(f"JoinsNamespaceOf={r.upstream_unit}")
    lines += ["", "[Service]"]
    if r.accept:
        lines += [
            "# The connection is fd 3 (LISTEN_FDS=1); forkproxy relays it and exits.",
            "Type=exec",
            f"ExecStart={exec_start(r)}",
        ]
    else:
        config = forkproxy_config(r)
        lines += ["Type=notify", f"ExecStart={exec_start(r)}", "Restart=on-failure"]
        watchdog = watchdog_sec(config)
        if watchdog is not None:
            lines += [
                "# The master pings while its workers' heartbeats are fresh; this is three",
                "# --worker-timeout=, so that it replaces a stuck worker before systemd acts.",
                f"WatchdogSec={watchdog}s",
            ]
        lines += [
            "# SIGTERM goes to the master, which drains its workers; anything left when",
            "# TimeoutStopSec= (keep it above --graceful-timeout=) runs out is killed.",
            "KillMode=mixed",
            f"# {FDS_PER_CONNECTION} fds per connection (client, upstream, two pipes) for "
            f"--connections-max={config.connections_max}, plus {FDS_SPARE}.",
            f"LimitNOFILE={limit_nofile(config)}",
        ]
    lines += ["", *(_USER_HARDENING if r.user else _SYSTEM_HARDENING), *_network(r)]
    return _join(lines)


# Options that need no privileges: seccomp filters under NoNewPrivileges=.
_COMMON_HARDENING = [
    "NoNewPrivileges=yes",
    "LockPersonality=yes",
    "MemoryDenyWriteExecute=yes",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "UMask=0077",
    "SystemCallArchitectures=native",
    "# @system-service has the SysV semaphore calls (@ipc) of the cross-worker connection",
    "# cap; the rest of the list fails with EPERM (no uid, clock or scheduling changes).",
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged @resources",
    "SystemCallErrorNumber=EPERM",
]
_SYSTEM_HARDENING = [
    "# Hardening: forkproxy needs only its passed sockets, the target and its own memory.",
    "# DynamicUser= implies RemoveIPC=yes, which removes the SysV semaphore of the",
    "# connection cap when the service stops.",
    "DynamicUser=yes",
    "CapabilityBoundingSet=",
    "AmbientCapabilities=",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "DevicePolicy=closed",
    "PrivateMounts=yes",
    "PrivateUsers=yes",
    "ProtectClock=yes",
    "ProtectControlGroups=yes",
    "ProtectHostname=yes",
    "ProtectKernelLogs=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelTunables=yes",
    "# ProcSubset=pid is left out: Prometheus' process metrics read /proc/stat.",
    "ProtectProc=invisible",
    *_COMMON_HARDENING,
]
_USER_HARDENING = [
    "# Hardening a user manager can apply without privileges or user namespaces.",
    *_COMMON_HARDENING,
]


def _network(r: UnitRequest) -> list[str]:
    """Address families and IP access for the target only; passed sockets are exempt."""
    upstream = parse_upstream(r.target)
    if upstream.family == socket.AF_VSOCK:  # issue 6: vsock:CID:PORT targets
        lines = [
            "# Network: AF_UNIX for sd_notify(3), AF_VSOCK for the target; no IP at all.",
            "RestrictAddressFamilies=AF_UNIX AF_VSOCK",
        ]
        if not r.user:
            lines.append("IPAddressDeny=any")
        if r.share_namespace:
            lines += [f"# {r.upstream_unit} needs PrivateNetwork=yes too.", "PrivateNetwork=yes"]
        return lines
    lines = ["# Network: AF_UNIX for sd_notify(3); AF_VSOCK is left out (no vsock targets)."]
    if upstream.family == 0:
        lines += [
            f"# {r.target} is resolved at connect time, so any IP address may be reached.",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        ]
    elif upstream.family in (socket.AF_INET, socket.AF_INET6):
        family = "AF_INET" if upstream.family == socket.AF_INET else "AF_INET6"
        lines.append(f"RestrictAddressFamilies=AF_UNIX {family}")
        if not r.user:
            address = upstream.host.partition("%")[0]
            lines += [
                f"# IP traffic to and from {address} only; change it with the target.",
                "IPAddressDeny=any",
                f"IPAddressAllow={_specifiers(address)}",
            ]
    else:
        lines.append("RestrictAddressFamilies=AF_UNIX")
        if not r.user:
            lines.append("IPAddressDeny=any")
            if r.target.startswith("/") and not r.share_namespace:
                lines += [
                    "# A socket file is reachable from any network namespace (an @abstract",
                    "# one is not), so the service gets a private one.",
                    "PrivateNetwork=yes",
                ]
    if r.share_namespace:
        lines += [f"# {r.upstream_unit} needs PrivateNetwork=yes too.", "PrivateNetwork=yes"]
    return lines


def _join(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


# ---- output -----------------------------------------------------------------------------


def write_units(files: dict[str, str], directory: str, force: bool) -> list[str]:
    """Write every file or none; return the paths written."""
    paths = {name: os.path.join(directory, name) for name in files}
    if not force:
        for path in paths.values():
            if os.path.lexists(path):
                raise ForkproxyError(f"'{path}' exists: remove it or pass --force")
    try:
        os.makedirs(directory, exist_ok=True)
        for name, text in files.items():
            temporary = paths[name] + ".tmp"
            with open(temporary, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(temporary, 0o644)
            os.replace(temporary, paths[name])
    except OSError as e:
        raise ForkproxyError(f"cannot write '{e.filename or directory}': {e.strerror}") from None
    return list(paths.values())


def run(argv: list[str]) -> int:
    """The whole program: 0 on success, 1 with one line on stderr for any error."""
    try:
        flags = _split(argv)[0]
        if "-h" in flags or "--help" in flags:
            sys.stdout.write(USAGE)
            return 0
        if "--version" in flags:
            print(f"{PROG} {__version__}")
            return 0
        request, output = parse_args(argv)
        files = render(request)
        if output.directory is None:
            print("\n".join(f"==> {name} <==\n{text}" for name, text in files.items()), end="")
            return 0
        for path in write_units(files, output.directory, output.force):
            print(f"wrote {path}")
    except ForkproxyError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    systemctl = "systemctl --user" if request.user else "systemctl"
    sockets = " ".join(request.socket_names)
    print(f"next: {systemctl} daemon-reload && {systemctl} enable --now {sockets}")
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))
