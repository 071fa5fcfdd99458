"""A worker's listeners relayed by the compiled engine (csrc/, forkproxy.relay._engine).

`CompiledRelay` builds the worker's `Engine` from each listener's settings, worked out as
plans.py works them out for the Python engine (listeners with the same settings and rows
share a route, routes with the same targets, connect timeout, TCP options and rows share
its targets; targets with rows in the shared target table are picked, cooled down and
counted by it as balance.py does), nests the engine's epoll in the worker's loop, and
answers the engine's hooks: host names resolved with the loop's getaddrinfo, conditions
logged with the Python engine's lines (refusals.py, connecting.py, accepting.py,
relaying.py) and rate limits, the last connection's end, and queue mode's wait for capacity
(capacity_wait.py's thread, which only waits; the loop thread retries). The engine
writes the slot's counters and histograms and takes and gives back admissions itself, as
the Python engine does, so metrics, STATUS, the idle exit and /healthz read the same
words. Its datagram listeners (all of a worker's, when none has a host-name target:
compiled_datagram.py) are read the same way, their sessions counted in the listeners'
rows. Never relays a byte itself, and never touches a listener but to close its copy.
"""

import asyncio
import dataclasses
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from forkproxy import logs
from forkproxy.relay.accepting import ACCEPT_PAUSE, fd_ceiling
from forkproxy.relay.access_log import AccessLogFiles
from forkproxy.relay.balance import FIRST
from forkproxy.relay.capacity_wait import CapacityWaiter
from forkproxy.relay.compiled_datagram import DatagramEvents
from forkproxy.relay.messages import UDP_MESSAGE_MAX
from forkproxy.relay.target_connect import SocketOptions
from forkproxy.relay.targets import COOLDOWN
from forkproxy.settings.address import TargetAddress
from forkproxy.settings.config import Config, ListenerSettings
from forkproxy.settings.options import ON_LIMIT_QUEUE, tcp_socket_options
from forkproxy.shared.layout import engine_offsets
from forkproxy.shared.listener import Listener
from forkproxy.shared.protocol import WorkerSpec, pipe_pool_keep
from forkproxy.shared.targets_table import ListenerTargets

if TYPE_CHECKING:
    from forkproxy.relay.worker import Worker

log = logging.getLogger("forkproxy")

_ACCEPT_PAUSING_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_QUIET_ERRNOS = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM)


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One route as the engine reads it (csrc/README.md): its targets and settings;
    `group`: routes of one group share their targets' round-robin and cool-down; `rows`
    (None: none), `turn` and `first`: its targets' rows of the target table, its
    round-robin word, --balance first."""

    targets: tuple[TargetAddress, ...]
    group: int
    connect_timeout: float
    idle_timeout: float
    proxy_protocol: int
    tcp_options: SocketOptions
    pipe_size: int
    pipe_keep: int
    rows: tuple[int, ...] | None = None
    turn: int = -1
    first: bool = False

    @property
    def label(self) -> str:
        """As targets.py's TargetGroup.label: 'a:1' or 'b:2'."""
        return " or ".join(f"'{target.text}'" for target in self.targets)


@dataclass(frozen=True, slots=True)
class EnginePlan:
    """The engine's listeners ((fd, route, source limit, row) each), its datagram
    listeners ((fd, route, source limit, row, --datagram-replies, --datagram-timeout)
    each) and routes."""

    listeners: tuple[tuple[int, int, int, int] | tuple[int, int, int, int, int, int, str], ...]
    routes: tuple[RouteSpec, ...]
    datagram_listeners: tuple[tuple[int, int, int, int, int, float], ...] = ()


GroupKey = tuple[tuple[TargetAddress, ...], float, SocketOptions, str, ListenerTargets | None]


def engine_plan(
    listeners: Sequence[Listener],
    rows: Sequence[int],
    config: Config,
    targets: Sequence[ListenerTargets | None] | None = None,
    datagram: Sequence[tuple[Listener, int]] = (),
    access_logs: AccessLogFiles | None = None,
) -> EnginePlan:
    """The engine's configuration for `listeners` (rows: each one's index among the
    master's listeners, its row of counters; targets: each one's rows of the target
    table, if it has them), by the rules of plans.make_plans; and for the `datagram`
    listeners (each with its row, -1 for none). A stream listener with --access-log gets
    its file's descriptor (from `access_logs`), the format and its name for the lines."""
    routes: dict[tuple[ListenerSettings, ListenerTargets | None], int] = {}
    groups: dict[GroupKey, int] = {}
    specs: list[RouteSpec] = []
    entries: list[tuple[int, int, int, int] | tuple[int, int, int, int, int, int, str]] = []
    if targets is None:
        targets = [None] * len(listeners)
    all_listeners = [*zip(listeners, rows, targets, strict=True)]
    all_listeners += [(listener, row, None) for listener, row in datagram]
    datagram_entries = []
    for listener, row, table in all_listeners:
        settings = config.settings_for(listener.name)
        shared = (dataclasses.replace(settings, name=""), table)
        route = routes.get(shared)
        if route is None:
            tcp_options = tcp_socket_options(settings.nodelay, settings.keepalive)
            key = (settings.targets, settings.connect_timeout, tcp_options, settings.balance, table)
            group = groups.setdefault(key, len(groups))
            route = routes[shared] = len(specs)
            specs.append(
                RouteSpec(
                    targets=settings.targets,
                    group=group,
                    connect_timeout=settings.connect_timeout,
                    idle_timeout=settings.idle_timeout,
                    proxy_protocol=settings.proxy_protocol,
                    tcp_options=tcp_options,
                    pipe_size=settings.pipe_size,
                    pipe_keep=pipe_pool_keep(settings.pipe_size),
                    rows=None if table is None else table.rows,
                    turn=-1 if table is None else table.route,
                    first=settings.balance == FIRST,
                )
            )
        limit = settings.connections_max_per_source
        if listener.is_datagram:
            datagram_entries.append(
                (
                    listener.fd,
                    route,
                    limit,
                    row,
                    settings.datagram_replies,
                    settings.datagram_timeout,
                )
            )
        elif settings.access_log and access_logs is not None:
            log_fd = access_logs.descriptor(settings.access_log)
            json = 1 if settings.access_log_format == "json" else 0
            name = listener.name or listener.label  # as plans.py names it
            entries.append((listener.fd, route, limit, row, log_fd, json, name))
        else:
            entries.append((listener.fd, route, limit, row))
    return EnginePlan(tuple(entries), tuple(specs), tuple(datagram_entries))


class CompiledRelay:
    """A worker's compiled engine: its set-up, its place in the loop, its hooks."""

    def __init__(
        self,
        worker: "Worker",
        module: ModuleType,
        listeners: Sequence[Listener],
        rows: Sequence[int],
        datagram: Sequence[tuple[Listener, int]] = (),
        datagram_buffer: int = UDP_MESSAGE_MAX,
    ) -> None:
        """`listeners`: the stream listeners it accepts on, `rows` their rows of counters;
        `datagram`: the datagram listeners it reads, each with its row (-1: none)."""
        spec = worker.spec
        config = worker.config
        self.worker = worker
        self.loop = worker.loop
        self.listeners = tuple(listeners)
        self.connections_max = config.connections_max
        self.internal_errors = worker.internal_errors
        targets = _listener_targets(spec, rows)
        plan = engine_plan(self.listeners, rows, config, targets, datagram, worker.access_logs)
        self.routes = plan.routes
        self.source_limits = [entry[2] for entry in plan.listeners]
        self.seq_address = spec.admission.seq_address
        self.waiter: CapacityWaiter | None = None  # queue mode: started when first needed
        self.resolving: set[asyncio.Task[None]] = set()
        self.resolve_errors: dict[str, str] = {}  # host: why it last failed to resolve
        # The Python engine's rate limits, one per line kind as it has them.
        self.at_cap = logs.RateLimitedLog(log, logging.WARNING)  # and busy
        self.per_source_lines = logs.RateLimitedLog(log, logging.WARNING)
        self.failures = logs.RateLimitedLog(log, logging.WARNING)  # accepting, descriptors
        self.connect_failures = logs.RateLimitedLog(log, logging.WARNING)
        self.target_failures = logs.RateLimitedLog(log, logging.WARNING)
        self.relay_failures = logs.RateLimitedLog(log, logging.WARNING)
        self.engine = module.Engine(
            spec.admission.mapping.memory,
            engine_offsets(),
            spec.slot,
            list(plan.listeners),
            list(self.routes),
            self,
            queue_on_limit=config.on_limit == ON_LIMIT_QUEUE,
            datagram_listeners=list(plan.datagram_listeners),
            datagram_buffer=datagram_buffer,
        )
        # Once the engine's own descriptors (its epoll, its timer) are open, as the
        # Acceptor's: the worker builds it last.
        self.fd_ceiling = fd_ceiling(spec.events_fd)
        self.engine.set_fd_ceiling(self.fd_ceiling)
        self._handlers = {
            module.EVENT_REFUSED_CAP: self._refused_cap,
            module.EVENT_REFUSED_BUSY: self._refused_busy,
            module.EVENT_REFUSED_SOURCE: self._refused_source,
            module.EVENT_CONNECT_FAILED: self._connect_failed,
            module.EVENT_TARGET_FAILED: self._target_failed,
            module.EVENT_ACCEPT_ERROR: self._accept_error,
            module.EVENT_FD_LOW: self._fd_low,
            module.EVENT_CONNECT_PAUSED: self._connect_paused,
            module.EVENT_RELAY_ERROR: self._relay_error,
        }
        datagram_events = DatagramEvents(module, [one for one, _ in datagram], config)
        self._handlers.update(datagram_events.handlers)

    # -- the worker's calls ------------------------------------------------------------------

    def start(self) -> None:
        self.loop.add_reader(self.engine.fileno(), self.dispatch)
        self._call(self.engine.start_accepting)

    def dispatch(self) -> None:
        """The engine's epoll is readable: run what is ready."""
        self._call(self.engine.dispatch)

    def drain(self) -> None:
        """The worker drains: accept and read no more (on_drained once nothing is open),
        then close our copies of the stream listeners (the engine stops watching them
        first: epoll watches the open file, which the master and systemd keep open). The
        datagram ones stay open: the sessions' replies still go out through them."""
        self._call(lambda: self.engine.stop_accepting(drain=True))
        for listener in self.listeners:
            listener.sock.close()

    def close_all(self) -> None:
        """The graceful timeout: as the Python engine, abort what is open."""
        self._call(self.engine.close_all)

    def idle(self) -> bool:
        engine = self.engine
        return (
            engine.open_connections() == 0 and engine.open_sessions() == 0 and not engine.holding()
        )

    def open_count(self) -> int:
        """Connections and datagram sessions open."""
        return int(self.engine.open_connections()) + int(self.engine.open_sessions())

    def close(self) -> None:
        if self.waiter is not None:
            self.waiter.stop()
        self.engine.close()

    def _call(self, call: Callable[[], object]) -> None:
        """Run an engine call; an exception is a hook's (raised once the engine's work is
        done, nothing half-handled): one warning, and the worker goes on."""
        try:
            call()
        except Exception as error:
            self.internal_errors.report_other("in the compiled engine's hooks", error)

    # -- hooks the engine calls --------------------------------------------------------------

    def resolve(self, token: int, host: str, port: int) -> None:
        task = self.loop.create_task(self._resolve(token, host, port))
        self.resolving.add(task)
        task.add_done_callback(self.resolving.discard)

    async def _resolve(self, token: int, host: str, port: int) -> None:
        try:
            infos = await self.loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except Exception as error:  # as target_connect.py: a failed attempt, EHOSTUNREACH
            text = str(error)
            if len(self.resolve_errors) > 64:
                self.resolve_errors.clear()
            self.resolve_errors[host] = f"cannot resolve '{host}': {text}"
            self._call(lambda: self.engine.resolve_failed(token, errno.EHOSTUNREACH, text))
            return
        self.resolve_errors.pop(host, None)
        addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
        self._call(lambda: self.engine.resolved(token, addresses))

    def on_event(self, code: int, count: int, error: int, detail: tuple[int, object]) -> None:
        index, subject = detail
        self._handlers[code](count, error, index, subject)

    def on_idle(self) -> None:
        self.worker.on_compiled_idle()

    def on_drained(self) -> None:
        self.worker.on_drained_part()

    def on_capacity_wait(self, seq: int) -> None:
        """Queue mode: a client is held at the cap; wait for CAPACITY_SEQ to move from
        `seq` on the helper thread, then retry on the loop thread."""
        if self.waiter is None:
            self.waiter = CapacityWaiter(self.seq_address, self.loop, self._retry_held)
        self.waiter.wait(seq)

    def _retry_held(self) -> None:
        self._call(self.engine.retry_held)

    # -- the lines the Python engine logs -----------------------------------------------------

    def _refused_cap(self, count: int, _error: int, _index: int, client: object) -> None:
        self.at_cap.log_count(
            count,
            "connection cap %d reached, refusing connection from %s",
            self.connections_max,
            client,
        )

    def _refused_busy(self, count: int, _error: int, _index: int, client: object) -> None:
        self.at_cap.log_count(count, "admission lock busy, refusing connection from %s", client)

    def _refused_source(self, count: int, _error: int, index: int, client: object) -> None:
        self.per_source_lines.log_count(
            count,
            "connection limit %d per source reached, refusing connection from %s",
            self.source_limits[index],
            client,
        )

    def _connect_failed(self, count: int, error: int, index: int, client: object) -> None:
        route = self.routes[index]
        self.connect_failures.log_count(
            count,
            "cannot connect to target %s for %s: %s, closing connection",
            route.label,
            client,
            self._connect_error_text(error, route),
        )

    def _connect_error_text(self, error: int, route: RouteSpec) -> str:
        """What the Python engine's error says (target_connect.py's attempt_error)."""
        for target in route.targets:
            text = self._target_error_text(error, target)
            if text is not None:
                return text
        return os.strerror(error)

    def _target_error_text(self, error: int, target: TargetAddress) -> str | None:
        """The Python engine's words for `error` at `target`, where they are not strerror's:
        a missing IPv6 scope interface, a host name that did not resolve."""
        if error == errno.ENODEV and target.family == socket.AF_INET6:
            _, _, scope = target.host.partition("%")
            if scope and not _interface_exists(scope):
                return f"no network interface '{scope}' for '{target.host}'"
        if error == errno.EHOSTUNREACH and target.family == 0:
            return self.resolve_errors.get(target.host)
        return None

    def _target_failed(self, count: int, error: int, _index: int, target: object) -> None:
        if isinstance(target, TargetAddress):
            text = target.text
            why = self._target_error_text(error, target) or os.strerror(error)
        else:
            text, why = str(target), os.strerror(error)
        self.target_failures.log_count(
            count,
            "cannot connect to target '%s': %s; trying the other targets, and it only "
            "after them for %gs",
            text,
            why,
            COOLDOWN,
        )

    def _accept_error(self, count: int, error: int, index: int, _subject: object) -> None:
        label = self.listeners[index].label
        if error in _ACCEPT_PAUSING_ERRNOS:
            self.failures.log_count(
                count,
                "cannot accept on %s: %s; pausing accepts for %gs",
                label,
                os.strerror(error),
                ACCEPT_PAUSE,
            )
        elif error not in _ACCEPT_QUIET_ERRNOS:
            failure = OSError(error, os.strerror(error))
            self.failures.log_count(count, "cannot accept on %s: %s, ignoring", label, failure)

    def _fd_low(self, count: int, _error: int, _index: int, _subject: object) -> None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.failures.log_count(
            count,
            "fewer than %d file descriptors left (RLIMIT_NOFILE %d): pausing accepts for %gs "
            "to keep them for open connections",
            limit - self.fd_ceiling,
            limit,
            ACCEPT_PAUSE,
        )

    def _connect_paused(self, count: int, error: int, index: int, _client: object) -> None:
        self.failures.log_count(
            count,
            "cannot open a connection to target %s: %s; pausing accepts for %gs",
            self.routes[index].label,
            os.strerror(error),
            ACCEPT_PAUSE,
        )

    def _relay_error(self, count: int, error: int, _index: int, client: object) -> None:
        self.relay_failures.log_count(
            count,
            "connection from %s failed: %s, closing connection",
            client,
            OSError(error, os.strerror(error)),
        )


def _interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _listener_targets(spec: WorkerSpec, rows: Sequence[int]) -> list[ListenerTargets | None]:
    """Each listener's rows of the target table (by its index among the master's
    listeners), or None without a table."""
    table = spec.listener_targets if spec.targets is not None else ()
    return [table[row] if row < len(table) else None for row in rows]


def stream_listener_rows(all_listeners: Sequence[Listener], mine: Sequence[Listener]) -> list[int]:
    """Each of `mine`'s index among the master's listeners (its row of counters)."""
    index = {id(listener): row for row, listener in enumerate(all_listeners)}
    return [index[id(listener)] for listener in mine]
