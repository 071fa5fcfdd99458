"""forkproxy-units' command line: flags, NAME, TARGET and forkproxy's options to a request.

`forkproxy-units NAME [FLAGS...] [--] TARGET [FORKPROXY-OPTIONS...]`, or `--unit NAME`
among the flags instead of the first word: flags before TARGET are the generator's,
TARGET and everything after it go to forkproxy's ExecStart= as given. `canonical_args`
is the inverse, for the "regenerate with" line of each unit. Never renders and never
writes.
"""

import os
import shutil

from forkproxy.errors import ForkproxyError
from forkproxy.units import checks, listen
from forkproxy.units.request import (
    PACKAGED_EXECUTABLE,
    PROG,
    SYSTEM_EXECUTABLE,
    USER_EXECUTABLE,
    Output,
    UnitRequest,
)

USAGE = f"""\
usage: {PROG} NAME [FLAGS...] [--] TARGET [FORKPROXY-OPTIONS...]
       {PROG} --unit NAME [FLAGS...] [--] TARGET [FORKPROXY-OPTIONS...]

Generate NAME.socket and NAME.service (NAME@.service with --accept) that run
`forkproxy TARGET FORKPROXY-OPTIONS` under socket activation. FORKPROXY-OPTIONS
(more targets, --route, e.g. --connections-max=1024 --exit-idle-time=5min) go
to ExecStart= as given, after TARGET; the sandbox lets every target through.

flags:
  --unit NAME            name the units NAME.socket, NAME.service (instead of
                         the first word; for a NAME that starts with '-')
  --listen-stream ADDR   listen on PORT, IPV4:PORT, [IPV6]:PORT, [IPV6%DEV]:PORT
                         (repeatable)
  --listen-unix PATH     listen on a unix socket, /path or @abstract (repeatable)
  --listen-datagram ADDR receive UDP datagrams on PORT, IPV4:PORT or [IPV6]:PORT
                         (ListenDatagram=; repeatable; TARGET is then udp:HOST:PORT
                         or unix-dgram:PATH)
  --listen-unix-datagram PATH
                         receive datagrams on a unix socket, /path or @abstract
                         (ListenDatagram=; repeatable)
  --listen-sequential-packet PATH
                         listen on a unix SOCK_SEQPACKET socket, /path or @abstract
                         (ListenSequentialPacket=; repeatable; TARGET is then
                         seqpacket:PATH)
  --socket-user USER     owner of the unix socket files (SocketUser=)
  --socket-group GROUP   group of the unix socket files (SocketGroup=)
  --socket-mode MODE     octal access mode of the unix socket files (SocketMode=)
  --backlog N            queue of connections not yet accepted (Backlog=)
  --accept               one forkproxy per connection (Accept=yes, NAME@.service)
  --max-connections N    with --accept: instances at once (MaxConnections=)
  --metrics ADDR         serve Prometheus metrics on ADDR (NAME-metrics.socket)
  --target-unit UNIT     the unit serving TARGET, started first (Requires=, After=)
  --share-namespace      run in UNIT's network namespace (JoinsNamespaceOf=)
  --description TEXT     Description= of the units
  --executable PATH      forkproxy's absolute path (default
                         {SYSTEM_EXECUTABLE}; {PACKAGED_EXECUTABLE} when run
                         as /usr/bin/{PROG}; {USER_EXECUTABLE}
                         with --user)
  --user                 units for a user manager (systemctl --user)
  --output-dir DIR       write the files to DIR (default: print them; a dry run)
  --force                with --output-dir: replace existing files
  -h, --help             show this help and exit
  --version              show the version and exit

See man {PROG} for the units, their sandbox and more examples.
"""

_VALUE_FLAGS = frozenset({
    "--listen-stream", "--listen-unix", "--socket-user", "--socket-group", "--socket-mode",
    "--backlog", "--max-connections", "--metrics", "--target-unit", "--description",
    "--executable", "--output-dir", "--unit",
})  # fmt: skip
# The flags of sockets of other kinds than streams, and the request field of each.
_MESSAGE_FLAGS = {
    "--listen-datagram": "listen_datagram",
    "--listen-unix-datagram": "listen_unix_datagram",
    "--listen-sequential-packet": "listen_sequential_packet",
}
_VALUE_FLAGS |= _MESSAGE_FLAGS.keys()
# Old spellings still accepted, not in --help: old to current.
_ALIASES = {"--upstream-unit": "--target-unit"}
_REPEATABLE = frozenset({"--listen-stream", "--listen-unix", *_MESSAGE_FLAGS})
_SWITCHES = frozenset({"--accept", "--share-namespace", "--user", "--force"})
_INFO_FLAGS = frozenset({"-h", "--help", "--version"})


def parse_args(argv: list[str]) -> tuple[UnitRequest, Output]:
    """A command line (without the program name) to what to render and where to put it."""
    values, positional, rest = split_args(argv)
    if "--unit" in values:
        positional.insert(0, values["--unit"][0])
    if not positional:
        raise ForkproxyError(f"missing unit NAME (see '{PROG} --help')")
    if len(positional) < 2:
        raise ForkproxyError("missing TARGET: give HOST:PORT or a unix socket path")
    request = _build_request(positional[0], positional[1], tuple(rest), values)
    output = Output(_one(values, "--output-dir"), "--force" in values)
    if output.force and output.directory is None:
        raise ForkproxyError("--force needs --output-dir")
    return request, output


def default_executable(program: str) -> str:
    """forkproxy's path when --executable is not given: the packaged one when this
    forkproxy-units is the package's (/usr/bin, also as /bin), else SYSTEM_EXECUTABLE."""
    if program and os.sep not in program:
        program = shutil.which(program) or ""
    if program:
        here = os.path.realpath(os.path.dirname(os.path.abspath(program)))
        if here == os.path.dirname(PACKAGED_EXECUTABLE):
            return PACKAGED_EXECUTABLE
    return SYSTEM_EXECUTABLE


def split_args(argv: list[str]) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Flags (name to values), NAME (unless --unit gives it) and TARGET, and the forkproxy
    options after TARGET."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise ForkproxyError(f"argument {arg!r} is not valid UTF-8") from None
    values: dict[str, list[str]] = {}
    positional: list[str] = []
    i = 0
    while i < len(argv) and len(positional) < (1 if "--unit" in values else 2):
        arg = argv[i]
        i += 1
        if arg == "--":
            if not positional and "--unit" not in values:
                raise ForkproxyError("missing unit NAME before '--'")
            positional.extend(argv[i : i + 1])
            i += 1
        elif not arg.startswith("-") or arg == "-":
            positional.append(arg)
        else:
            flag, has_value, value = arg.partition("=")
            name = _ALIASES.get(flag, flag)
            if name in _SWITCHES or name in _INFO_FLAGS:
                if has_value:
                    raise ForkproxyError(f"option '{flag}' takes no value")
            elif name in _VALUE_FLAGS:
                if not has_value:
                    if i == len(argv):
                        raise ForkproxyError(f"option '{flag}' needs a value")
                    value = argv[i]
                    i += 1
            else:
                raise ForkproxyError(
                    f"unknown option '{flag}' (forkproxy's own options go after TARGET)"
                )
            if name == "--unit" and positional:
                raise ForkproxyError(
                    f"unit name given twice: '{positional[0]}', and '{value}' with --unit"
                )
            values.setdefault(name, []).append(value)
    for flag, given in values.items():
        if len(given) > 1 and flag not in _REPEATABLE:
            raise ForkproxyError(f"option '{flag}' given more than once")
    for arg in argv[i:]:
        flag = arg.partition("=")[0]
        if _ALIASES.get(flag, flag) in _VALUE_FLAGS or flag in _SWITCHES:
            raise ForkproxyError(
                f"option '{flag}' after TARGET would go to forkproxy: give the {PROG} "
                "flags before TARGET"
            )
    return values, positional, argv[i:]


def canonical_args(request: UnitRequest) -> list[str]:
    """The command line that renders `request`, flags in a fixed order."""
    r = request
    # A NAME that looks like a flag is given with --unit.
    args = ["--unit", r.name] if r.name.startswith("-") else [r.name]
    args += [word for address in r.listen_stream for word in ("--listen-stream", address)]
    args += [word for path in r.listen_unix for word in ("--listen-unix", path)]
    for flag, field in _MESSAGE_FLAGS.items():
        args += [word for address in getattr(r, field) for word in (flag, address)]
    mode = None if r.socket_mode is None else f"{r.socket_mode:04o}"
    for flag, value in (
        ("--socket-user", r.socket_user),
        ("--socket-group", r.socket_group),
        ("--socket-mode", mode),
        ("--backlog", r.backlog),
        ("--accept", r.accept),
        ("--max-connections", r.max_connections),
        ("--metrics", r.metrics),
        ("--target-unit", r.target_unit),
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
        return None if text is None else checks.parse_count(text, flag, 2**32 - 1)

    mode = _one(values, "--socket-mode")
    metrics = _one(values, "--metrics")
    streams = values.get("--listen-stream", [])
    unix_paths = values.get("--listen-unix", [])
    datagrams = values.get("--listen-datagram", [])
    unix_datagrams = values.get("--listen-unix-datagram", [])
    packets = values.get("--listen-sequential-packet", [])
    request = UnitRequest(
        name=checks.check_name(name),
        target=checks.check_target(target),
        forkproxy_args=forkproxy_args,
        listen_stream=tuple(
            listen.parse_inet(address, "--listen-stream").text for address in streams
        ),
        listen_unix=tuple(listen.parse_unix(path, "--listen-unix").text for path in unix_paths),
        listen_datagram=tuple(
            listen.parse_inet(address, "--listen-datagram").text for address in datagrams
        ),
        listen_unix_datagram=tuple(
            listen.parse_unix(path, "--listen-unix-datagram").text for path in unix_datagrams
        ),
        listen_sequential_packet=tuple(
            listen.parse_unix(path, "--listen-sequential-packet").text for path in packets
        ),
        socket_user=checks.check_user_group(_one(values, "--socket-user"), "--socket-user"),
        socket_group=checks.check_user_group(_one(values, "--socket-group"), "--socket-group"),
        socket_mode=None if mode is None else checks.parse_mode(mode),
        backlog=number("--backlog"),
        accept="--accept" in values,
        max_connections=number("--max-connections"),
        metrics=None if metrics is None else listen.parse_metrics(metrics).text,
        target_unit=checks.check_target_unit(_one(values, "--target-unit")),
        share_namespace="--share-namespace" in values,
        description=checks.check_description(_one(values, "--description")),
        executable=checks.check_executable(_one(values, "--executable")),
        user="--user" in values,
    )  # fmt: skip
    checks.check_combinations(request)
    return request
