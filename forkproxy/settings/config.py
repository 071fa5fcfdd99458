"""The frozen `Config` a master and its workers run with, and the checks across fields.

A `Config` holds the global settings and, per named listener that has settings of its
own (a `[listeners.NAME]` section of the configuration file, or `--route NAME=TARGET`),
a frozen `ListenerSettings`: its targets and relay options, the global ones filled in
for what it does not set. Built by `settings.arguments.parse_args`; never parses argv
and never does I/O.
"""

import dataclasses
import math
import os
from dataclasses import dataclass

from forkproxy.errors import UsageError
from forkproxy.settings.address import ListenAddress, TargetAddress
from forkproxy.settings.kinds import check_one_kind
from forkproxy.settings.options import (
    ON_LIMIT_MODES,
    ON_LIMIT_REFUSE,
    KeepAlive,
    format_size,
)
from forkproxy.settings.timespan import format_timespan

DEFAULT_CONNECTIONS_MAX = 256  # systemd-socket-proxyd's default
# systemd-socket-proxyd's range for -c (an unsigned int); admission counts in 64-bit words
# and sizes nothing by the cap beyond a bounded per-source table (shared/layout.py).
CONNECTIONS_MAX_LIMIT = (1 << 32) - 1
DEFAULT_GRACEFUL_TIMEOUT = 30.0
DEFAULT_WORKER_TIMEOUT = 30.0
# A worker's loop can stall for tens of milliseconds without anything wrong (a burst of
# accepts, a page fault, a loaded host, the per-source table's lock for up to 50 ms), and
# the master notices a missed heartbeat only on its own next wakeup. Below a second,
# killing such a worker, and every connection it holds, would do more harm than the
# stall; at 1s a worker still beats 4 times per timeout (`heartbeat_interval`).
MIN_WORKER_TIMEOUT = 1.0
DEFAULT_SOCKET_MODE = 0o666  # SocketMode= default in systemd.socket(5)
MAX_WORKERS = 128
# Relay option defaults; docs/relay-options.md gives the measurements behind the last two.
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_NODELAY = True
DEFAULT_PIPE_SIZE = 256 * 1024  # systemd-socket-proxyd's too; measured in docs/relay-options.md
PIPE_SIZE_MIN = 4096  # one page: the smallest pipe F_SETPIPE_SZ makes
PIPE_SIZE_MAX = 1 << 30
MAX_CONNECTIONS_PER_SOURCE = 32767  # fits the per-slot uint16 counts of the per-source table
DEFAULT_DATAGRAM_TIMEOUT = 30.0  # a datagram session ends after this long without traffic
MAX_DATAGRAM_REPLIES = 1 << 32
# Active health checks (supervisor/health.py): off by default.
MIN_CHECK_INTERVAL = 0.01  # the master's loop, not a busy one
DEFAULT_CHECK_RISE = 2  # checks passed in a row that make a down target up
DEFAULT_CHECK_FALL = 3  # checks failed in a row that make an up target down
MAX_CHECK_STREAK = 1000
DEFAULT_CHECK_TIMEOUT = 2.0  # or the interval, if shorter
MAX_CHECK_PATH = 1024
# How a route picks its target (relay/balance.py): the first is the default.
BALANCE_MODES = ("round-robin", "least-connections", "source", "first")
DEFAULT_BALANCE = BALANCE_MODES[0]


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """Where the clients of one named listener go, and how they are relayed.

    Its fields but `name`, `targets` and `origin` are the per-listener relay options:
    each is also a `Config` field of the same name (the global value) and the dest of
    the command-line option that sets it (RELAY_OPTIONS).
    """

    name: str
    targets: tuple[TargetAddress, ...]
    proxy_protocol: int = 0  # PROXY protocol version sent to the target; 0: none
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float = math.inf
    keepalive: KeepAlive | None = None
    nodelay: bool = DEFAULT_NODELAY
    pipe_size: int = DEFAULT_PIPE_SIZE
    connections_max_per_source: int = 0  # 0: no per-source limit
    datagram_timeout: float = DEFAULT_DATAGRAM_TIMEOUT  # datagram listeners' sessions
    datagram_replies: int = 0  # a session ends after this many replies; 0: no limit
    check_interval: float = 0.0  # active health checks this often; 0 (or infinity): none
    check_http: str = ""  # the path of an HTTP check; "": a check only connects
    check_rise: int = DEFAULT_CHECK_RISE
    check_fall: int = DEFAULT_CHECK_FALL
    check_timeout: float | None = None  # None: the interval, at most DEFAULT_CHECK_TIMEOUT
    balance: str = DEFAULT_BALANCE  # how a target is picked among the usable ones
    backup: tuple[TargetAddress, ...] = ()  # tried only when no target is usable
    connect_retry: float = 0.0  # retry while every target refuses, for this long
    # Where it was set, for messages ("[listeners.web] in /etc/forkproxy.toml:7").
    origin: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        _check_relay_options(self)
        check_one_kind(self.targets + self.backup, f"the targets of listener '{self.name}'")
        _check_backups(self.targets, self.backup)

    @property
    def checks(self) -> bool:
        """Whether its targets get active health checks."""
        return 0 < self.check_interval < math.inf

    @property
    def effective_check_timeout(self) -> float:
        """How long one check may take (--check-timeout, else its default)."""
        if self.check_timeout is not None:
            return self.check_timeout
        return min(self.check_interval, DEFAULT_CHECK_TIMEOUT)

    def relay_options(self) -> dict[str, object]:
        """The relay options by field name (RELAY_OPTIONS)."""
        return {name: getattr(self, name) for name in RELAY_OPTIONS}


RELAY_OPTIONS = tuple(
    field.name
    for field in dataclasses.fields(ListenerSettings)
    if field.name not in ("name", "targets", "origin")
)


@dataclass(frozen=True, slots=True)
class Config:
    targets: tuple[TargetAddress, ...]  # empty only if every listener has its own
    connections_max: int = DEFAULT_CONNECTIONS_MAX
    exit_idle_time: float = math.inf
    workers: int = 1
    listen: tuple[ListenAddress, ...] = ()
    socket_mode: int = DEFAULT_SOCKET_MODE
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT
    log_level: str = "info"
    inetd: bool = False  # relay the one connection on standard input, then exit
    metrics: ListenAddress | None = None  # --metrics; a passed socket named "metrics" wins
    # Relay options (relay_arguments.py).
    proxy_protocol: int = 0  # PROXY protocol version sent to the target; 0: none
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float = math.inf
    keepalive: KeepAlive | None = None
    nodelay: bool = DEFAULT_NODELAY
    pipe_size: int = DEFAULT_PIPE_SIZE
    on_limit: str = ON_LIMIT_REFUSE
    connections_max_per_source: int = 0  # 0: no per-source limit
    datagram_timeout: float = DEFAULT_DATAGRAM_TIMEOUT
    datagram_replies: int = 0  # a datagram session ends after this many replies; 0: none
    check_interval: float = 0.0  # active health checks (ListenerSettings says more)
    check_http: str = ""
    check_rise: int = DEFAULT_CHECK_RISE
    check_fall: int = DEFAULT_CHECK_FALL
    check_timeout: float | None = None
    balance: str = DEFAULT_BALANCE
    backup: tuple[TargetAddress, ...] = ()
    connect_retry: float = 0.0
    # Named listeners with settings of their own; the others use the global ones.
    listeners: tuple[ListenerSettings, ...] = ()

    def __post_init__(self) -> None:
        if not self.targets and not self.listeners:
            raise UsageError("missing target: give HOST:PORT or a unix socket path")
        if self.connections_max < 1:
            raise UsageError(f"--connections-max= must be at least 1, got {self.connections_max}")
        if self.connections_max > CONNECTIONS_MAX_LIMIT:
            raise UsageError(
                f"--connections-max= must be at most {CONNECTIONS_MAX_LIMIT}, "
                f"got {self.connections_max}"
            )
        if not 1 <= self.workers <= MAX_WORKERS:
            raise UsageError(f"--workers= must be in 1-{MAX_WORKERS}, got {self.workers}")
        if not self.worker_timeout >= MIN_WORKER_TIMEOUT:
            raise UsageError(
                f"--worker-timeout= must be at least {format_timespan(MIN_WORKER_TIMEOUT)}, "
                f"got {format_timespan(self.worker_timeout)}"
            )
        names = [listen.name for listen in self.listen if listen.name]
        if len(names) != len(set(names)):
            raise UsageError("--listen= names must be unique")
        _refuse_duplicate_listen(self.listen)
        if "metrics" in names:
            raise UsageError(
                "--listen= name 'metrics' is kept for the metrics socket: use --metrics="
            )
        if self.metrics is not None and any(
            (listen.family, listen.sockaddr) == (self.metrics.family, self.metrics.sockaddr)
            for listen in self.listen
        ):
            raise UsageError(f"--metrics={self.metrics.text} is also a --listen= address")
        _check_relay_options(self)
        check_one_kind(self.targets + self.backup, "the targets")
        if self.targets:
            _check_backups(self.targets, self.backup)
        if self.on_limit not in ON_LIMIT_MODES:
            raise UsageError(f"--on-limit= must be refuse or queue, got '{self.on_limit}'")
        listener_names = [settings.name for settings in self.listeners]
        if len(listener_names) != len(set(listener_names)):
            raise UsageError("listener settings must name distinct listeners")
        for settings in self.listeners:
            if not settings.targets:
                raise UsageError(f"listener '{settings.name}' has no target")

    @property
    def target(self) -> TargetAddress | None:
        return self.targets[0] if self.targets else None

    @property
    def heartbeat_interval(self) -> float:
        """How often a worker proves its loop runs: 4 times per worker timeout at least."""
        return min(1.0, self.worker_timeout / 4)

    def settings_for(self, name: str) -> ListenerSettings:
        """The settings of the listener named `name` (FileDescriptorName=, --listen
        NAME=): its own, else the global ones (whose targets are empty if every named
        listener has its own; the master refuses a listener left without)."""
        for settings in self.listeners:
            if settings.name == name:
                return settings
        return self.global_settings(name)

    def global_settings(self, name: str = "") -> ListenerSettings:
        """The global targets and relay options, as a listener without settings gets them."""
        options = {field: getattr(self, field) for field in RELAY_OPTIONS}
        return ListenerSettings(name, self.targets, **options)


def _check_relay_options(settings: "Config | ListenerSettings") -> None:
    """Ranges of the relay options, global or of one listener."""
    if settings.proxy_protocol not in (0, 1, 2):
        raise UsageError(f"--proxy-protocol= must be v1 or v2, got {settings.proxy_protocol}")
    if settings.connect_timeout <= 0:
        raise UsageError("--connect-timeout= must be longer than 0")
    if settings.idle_timeout <= 0:
        raise UsageError("--idle-timeout= must be longer than 0")
    if not PIPE_SIZE_MIN <= settings.pipe_size <= PIPE_SIZE_MAX:
        raise UsageError(
            f"--pipe-size= must be in {format_size(PIPE_SIZE_MIN)}-"
            f"{format_size(PIPE_SIZE_MAX)}, got {format_size(settings.pipe_size)}"
        )
    if not 0 <= settings.connections_max_per_source <= MAX_CONNECTIONS_PER_SOURCE:
        raise UsageError(
            f"--connections-max-per-source= must be in 0-{MAX_CONNECTIONS_PER_SOURCE}, "
            f"got {settings.connections_max_per_source}"
        )
    if settings.datagram_timeout <= 0:
        raise UsageError("--datagram-timeout= must be longer than 0")
    if not 0 <= settings.datagram_replies <= MAX_DATAGRAM_REPLIES:
        raise UsageError(
            f"--datagram-replies= must be in 0-{MAX_DATAGRAM_REPLIES}, "
            f"got {settings.datagram_replies}"
        )
    _check_check_options(settings)
    if settings.balance not in BALANCE_MODES:
        raise UsageError(
            f"--balance= must be one of {', '.join(BALANCE_MODES)}, got '{settings.balance}'"
        )
    if not 0 <= settings.connect_retry < math.inf:
        raise UsageError("--connect-retry= must be 0 (no retries) or a finite time span")


def _check_backups(targets: tuple[TargetAddress, ...], backup: tuple[TargetAddress, ...]) -> None:
    """A backup is another target than the route's targets, and given once."""
    seen = {target.text for target in targets}
    for target in backup:
        if target.text in seen:
            raise UsageError(f"--backup={target.text} is a target already")
        seen.add(target.text)


def _check_check_options(settings: "Config | ListenerSettings") -> None:
    """Ranges of the health check options."""
    interval = settings.check_interval
    if not (interval == 0 or interval >= MIN_CHECK_INTERVAL):
        raise UsageError(
            f"--check-interval= must be 0 (no checks) or at least "
            f"{format_timespan(MIN_CHECK_INTERVAL)}, got {format_timespan(interval)}"
        )
    for option, value in (("rise", settings.check_rise), ("fall", settings.check_fall)):
        if not 1 <= value <= MAX_CHECK_STREAK:
            raise UsageError(f"--check-{option}= must be in 1-{MAX_CHECK_STREAK}, got {value}")
    timeout = settings.check_timeout
    if timeout is not None and not 0 < timeout < math.inf:
        raise UsageError("--check-timeout= must be longer than 0 and finite")
    problem = http_path_problem(settings.check_http)
    if problem is not None:
        raise UsageError(f"--check-http= {problem}")


def http_path_problem(path: str) -> str | None:
    """Why `path` cannot be the path of an HTTP check, or None ("" means no HTTP check)."""
    if not path:
        return None
    if not path.startswith("/"):
        return "must be a path starting with '/'"
    if len(path) > MAX_CHECK_PATH:
        return f"must be at most {MAX_CHECK_PATH} characters long"
    if not all("!" <= char <= "~" for char in path):
        return "must be printable ASCII without spaces (percent-encode the rest)"
    return None


def _refuse_duplicate_listen(listen: tuple[ListenAddress, ...]) -> None:
    """One address given twice would fail to bind as if another process held it."""
    seen: set[tuple[int, object]] = set()
    for address in listen:
        sockaddr = address.sockaddr
        if isinstance(sockaddr, str) and sockaddr.startswith("/"):
            sockaddr = os.path.normpath(sockaddr)  # /run//a.sock is /run/a.sock
        key = (address.family, sockaddr)
        if key in seen:
            raise UsageError(f"--listen={address.text} is given twice")
        seen.add(key)


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))
