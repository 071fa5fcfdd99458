"""What a worker does with each listener's clients, worked out once from its settings.

A `ListenerPlan` per listener holds what accepting needs (the family, the client-side
TCP options, the per-source limit) and the listener's `Route`, which holds what
connecting and relaying need: the target group (a `Balancer` by the shared target
table, balance.py; or, without one, a `TargetGroup` of the worker's own, targets.py),
the PROXY header encoder, the relay's direction class, the pipe pool and the idle
sweep. Listeners with the same settings share one route, and routes with the same
targets, connect timeout and TCP options share one group; with no per-listener
settings every listener shares the one route of the global settings, so a connection
costs what it did before there were any. Never accepts, connects or relays.
"""

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forkproxy.relay.balance import Balancer
from forkproxy.relay.pipes import PipePool
from forkproxy.relay.proxy_protocol import HeaderEncoder, header_encoder
from forkproxy.relay.splice import Direction, IdleDirection, Relay
from forkproxy.relay.target_connect import TCP_FAMILIES, SocketOptions
from forkproxy.relay.targets import TargetGroup
from forkproxy.relay.timeouts import LazySweep, sweep_idle, sweep_interval
from forkproxy.settings.config import Config, ListenerSettings
from forkproxy.settings.options import tcp_socket_options
from forkproxy.shared.layout import ROW_WORDS, WORD
from forkproxy.shared.listener import Listener
from forkproxy.shared.protocol import pipe_pool_keep
from forkproxy.shared.scoreboard import Scoreboard
from forkproxy.shared.targets_table import ListenerTargets, TargetTable

if TYPE_CHECKING:
    from forkproxy.relay.connecting import Connector


@dataclass(frozen=True, slots=True)
class WorkerTargets:
    """A worker's view of the target table and of its slot's rows, for its plans."""

    table: TargetTable
    scoreboard: Scoreboard
    slot: int  # this worker's slot index
    by_fd: Mapping[int, ListenerTargets]  # each stream listener's rows, by its fd
    counters: Mapping[int, memoryview]  # each listener's row of counters in our slot


def spare_row() -> memoryview:
    """A row of counters nobody reads: for a listener or target without one."""
    return memoryview(bytearray(ROW_WORDS * WORD)).cast("q")


class Route:
    """How the clients of listeners with one set of settings are connected and relayed."""

    __slots__ = (
        "group",
        "proxy_header",
        "direction",
        "pool",
        "idle_relays",
        "idle_sweep",
        "on_relay_closed",
        "_closed",
    )

    def __init__(
        self,
        group: TargetGroup | Balancer,
        proxy_header: HeaderEncoder | None,
        pool: PipePool,
        on_relay_closed: Callable[[Relay], None],
        idle: tuple[LazySweep, set[Relay]] | None,
    ) -> None:
        self.group = group  # where its clients go
        self.proxy_header = proxy_header  # --proxy-protocol: the header's encoder
        self.pool = pool  # the worker's pool of pipes of this --pipe-size
        self.direction: type[Direction] = Direction
        self.idle_sweep: LazySweep | None = None  # --idle-timeout: watches idle_relays
        self.idle_relays: set[Relay] = set()
        self.on_relay_closed = on_relay_closed  # a relay of this route closed
        self._closed = on_relay_closed
        if idle is not None:
            self.direction = IdleDirection
            self.idle_sweep, self.idle_relays = idle
            self.on_relay_closed = self._on_idle_relay_closed

    def _on_idle_relay_closed(self, relay: Relay) -> None:
        self.idle_relays.discard(relay)
        self._closed(relay)


class ListenerPlan:
    """What a worker does with the clients of one listener."""

    __slots__ = (
        "listener",
        "family",
        "kind",
        "client_options",
        "source_limit",
        "route",
        "counters",
    )

    def __init__(
        self,
        listener: Listener,
        client_options: SocketOptions,
        source_limit: int,
        route: Route,
        counters: memoryview | None = None,
    ) -> None:
        self.listener = listener
        # The listener's row in the worker's slot: clients admitted, refused by reason.
        self.counters = spare_row() if counters is None else counters
        self.family = listener.sock.family
        self.kind = listener.kind  # stream or sequential-packet: what accept() returns
        self.client_options = client_options  # setsockopt(2) on each client: TCP only
        self.source_limit = source_limit  # --connections-max-per-source; 0: none
        self.route = route


def make_plans(
    listeners: Iterable[Listener],
    config: Config,
    connector: "Connector",
    pools: dict[int, PipePool],
    targets: WorkerTargets | None = None,
) -> dict[int, ListenerPlan]:
    """Each listener's plan, by fd. `pools` gets a pool per pipe size used (the worker
    closes them). With `targets`, a listener that has rows in the target table gets a
    `Balancer` (balance.py); else a `TargetGroup` of this worker's own."""
    routes: dict[tuple[ListenerSettings, ListenerTargets | None], Route] = {}
    groups: dict[tuple[object, ...], TargetGroup | Balancer] = {}
    plans = {}
    for listener in listeners:
        settings = config.settings_for(listener.name)
        tcp_options = tcp_socket_options(settings.nodelay, settings.keepalive)
        rows = None if targets is None else targets.by_fd.get(listener.fd)
        # What listeners share a route by: their settings, and their rows (by name).
        shared = (dataclasses.replace(settings, name=""), rows)
        route = routes.get(shared)
        if route is None:
            key = (
                settings.targets,
                settings.backup,
                settings.balance,
                settings.connect_retry,
                settings.connect_timeout,
                tcp_options,
                rows,
            )
            group = groups.get(key)
            if group is None:
                group = groups[key] = _group(settings, tcp_options, rows, targets, connector)
            route = routes[shared] = _route(settings, group, connector, pools)
        family = listener.sock.family
        plans[listener.fd] = ListenerPlan(
            listener,
            tcp_options if family in TCP_FAMILIES else (),
            settings.connections_max_per_source,
            route,
            None if targets is None else targets.counters.get(listener.fd),
        )
    return plans


def _group(
    settings: ListenerSettings,
    tcp_options: SocketOptions,
    rows: ListenerTargets | None,
    targets: WorkerTargets | None,
    connector: "Connector",
) -> TargetGroup | Balancer:
    if rows is None or targets is None:
        return TargetGroup(
            settings.targets + settings.backup,
            settings.connect_timeout,
            tcp_options,
            connector.on_target_failed,
        )
    return Balancer(
        settings.targets,
        settings.backup,
        rows.rows,
        rows.route,
        targets.table,
        targets.scoreboard,
        targets.slot,
        settings.balance,
        settings.connect_timeout,
        tcp_options,
        settings.connect_retry,
        connector.on_target_failed,
    )


def _route(
    settings: ListenerSettings,
    group: TargetGroup | Balancer,
    connector: "Connector",
    pools: dict[int, PipePool],
) -> Route:
    pool = pools.get(settings.pipe_size)
    if pool is None:
        size = settings.pipe_size
        pool = pools[size] = PipePool(size, pipe_pool_keep(size))
    proxy_header = None
    if settings.proxy_protocol:
        proxy_header = header_encoder(1 if settings.proxy_protocol == 1 else 2)
    idle = None
    timeout = settings.idle_timeout
    if timeout != math.inf:
        relays: set[Relay] = set()
        on_error = connector.crashed  # an exception escaped from one relay: abort it

        def sweep(now: float) -> None:
            sweep_idle(relays, now, timeout, on_error)

        idle = (LazySweep(connector.loop, sweep_interval(timeout), relays, sweep), relays)
    return Route(group, proxy_header, pool, connector.on_relay_closed, idle)


def min_connect_timeout(listeners: Iterable[Listener], config: Config) -> float:
    """The shortest --connect-timeout of these listeners: how often the sweep looks."""
    return min(
        (config.settings_for(listener.name).connect_timeout for listener in listeners),
        default=config.connect_timeout,
    )
