"""A worker's admitted clients on their way to a relay: connect, time out, fail, retry.

`Connector` opens each admitted client's connection to the target group of its
listener's `Route` (plans.py, targets.py, target_connect.py) without blocking, keeps
the clients whose connect is under way as `_PendingClient`s for the --connect-timeout
sweep, sends the PROXY header when the route asks, and hands both sockets to a `Relay`
(splice.py). A connect that fails closes its client with one warning; one that found
no free descriptor keeps its client and pauses accepting instead. Owns the open relays
until they close (a route's --idle-timeout sweep watches its own). Never accepts or
admits.
"""

import errno
import logging
import math
import socket
import time
from bisect import bisect_left
from typing import TYPE_CHECKING

from forkproxy import logs
from forkproxy.relay.accepting import ACCEPT_PAUSE
from forkproxy.relay.plans import Route, min_connect_timeout
from forkproxy.relay.proxy_protocol import HeaderEncoder
from forkproxy.relay.seqpacket import MessageRelay
from forkproxy.relay.splice import PEER_GONE_ERRNOS, Relay
from forkproxy.relay.target_connect import TCP_FAMILIES, TargetConnect, send_proxy_header
from forkproxy.relay.targets import COOLDOWN, FailoverConnect
from forkproxy.relay.timeouts import LazySweep, sweep_connects, sweep_interval
from forkproxy.settings.address import TargetAddress, format_sockaddr
from forkproxy.settings.kinds import SEQPACKET
from forkproxy.shared.scoreboard import (
    BYTES_TO_CLIENT,
    BYTES_TO_TARGET,
    CONNECT_DURATION_BOUNDS,
    CONNECT_DURATION_BUCKETS,
    CONNECT_DURATION_SUM_NS,
    CONNECT_ERRORS,
    CONNECTION_DURATION_BOUNDS,
    CONNECTION_DURATION_BUCKETS,
    CONNECTION_DURATION_SUM_NS,
)

if TYPE_CHECKING:
    from forkproxy.relay.worker import Worker

log = logging.getLogger("forkproxy")

# Connects retried after a pause when socket() found no free descriptor (EMFILE, ENFILE).
_RETRY_PAUSE_ERRNOS = (errno.EMFILE, errno.ENFILE)


class _PendingClient:
    """An admitted client while its connection to a target is being opened."""

    __slots__ = (
        "connector",
        "client",
        "token",
        "started",
        "peer",
        "connect",
        "route",
    )

    def __init__(
        self,
        connector: "Connector",
        client: socket.socket,
        token: int,
        peer: object,
        route: Route,
    ) -> None:
        self.connector = connector
        self.client = client
        self.token = token  # its admission, for Admitter.release
        self.started = time.monotonic()
        self.peer = peer
        self.connect: TargetConnect | FailoverConnect | None = None
        self.route = route  # its listener's: target group, PROXY header, pipes

    def on_connected(self, target: socket.socket) -> None:
        self.connector.on_target_connected(self, target)

    def on_failed(self, error: OSError) -> None:
        self.connector.on_connect_failed(self, error)


class Connector:
    """Connects a worker's admitted clients and keeps their relays until they close."""

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker  # draining or not; its acceptor, paused when short of fds
        self.config = worker.config
        self.loop = worker.loop
        self.poller = worker.poller
        self.slot = worker.slot
        self.connection_ended = worker.connection_ended
        self.pending: set[_PendingClient] = set()
        self.relays: set[Relay] = set()
        self.connect_failures = logs.RateLimitedLog(log, logging.WARNING)
        self.relay_failures = logs.RateLimitedLog(log, logging.WARNING)
        self.target_failures = logs.RateLimitedLog(log, logging.WARNING)
        # One sweep for every listener's connects, as often as the shortest timeout needs:
        # each attempt keeps its own deadline.
        self.connect_sweep: LazySweep | None = None
        connect_timeout = min_connect_timeout(worker.listeners, self.config)
        if connect_timeout != math.inf:
            self.connect_sweep = LazySweep(
                self.loop, sweep_interval(connect_timeout), self.pending, self._sweep_connects
            )

    def open_count(self) -> int:
        """Connections open: relaying, or still connecting."""
        return len(self.relays) + len(self.pending)

    # -- connecting ----------------------------------------------------------------------

    def connect(
        self,
        client: socket.socket,
        token: int,
        peer: object,
        route: Route,
    ) -> None:
        pending = _PendingClient(self, client, token, peer, route)
        self.pending.add(pending)
        self._start_connect(pending)

    def _start_connect(self, pending: _PendingClient) -> None:
        attempt = pending.route.group.connect(
            self.loop, self.poller, pending.on_connected, pending.on_failed
        )
        # On loopback the connect usually ended (on_target_connected or on_connect_failed ran)
        # inside group.connect(): only an attempt still under way is kept and timed.
        if pending in self.pending and pending.connect is None:
            pending.connect = attempt
            sweep = self.connect_sweep
            if sweep is not None and not sweep.armed:
                sweep.arm()

    def _sweep_connects(self, now: float) -> None:
        sweep_connects([p.connect for p in self.pending if p.connect is not None], now)

    def on_target_failed(self, target: TargetAddress, error: OSError, newly: bool) -> None:
        if newly:
            self.target_failures.log(
                "cannot connect to upstream '%s': %s; trying the other targets, and it only "
                "after them for %gs",
                target.text,
                error.strerror or error,
                COOLDOWN,
            )

    def on_target_connected(self, pending: _PendingClient, target: socket.socket) -> None:
        self.pending.discard(pending)
        pending.connect = None  # it holds our bound methods: no cycle left to the collector
        slot = self.slot
        _observe(
            slot,
            CONNECT_DURATION_BUCKETS,
            CONNECT_DURATION_BOUNDS,
            CONNECT_DURATION_SUM_NS,
            time.monotonic() - pending.started,
        )
        route = pending.route
        proxy_header = route.proxy_header
        if route.group.targets[0].kind == SEQPACKET:  # messages: no PROXY header, no splice
            relay: Relay = self._message_relay(pending.client, target, route)
        elif proxy_header is not None and not self._send_proxy_header(
            pending, target, proxy_header
        ):
            return
        else:
            relay = Relay(
                self.poller,
                route.pool,
                pending.client,
                target,
                slot,
                BYTES_TO_TARGET,
                BYTES_TO_CLIENT,
                route.on_relay_closed,
                route.direction,
            )
        relay.token = pending.token
        relay.started = pending.started
        relay.peer = pending.peer
        self.relays.add(relay)
        idle_sweep = route.idle_sweep
        if idle_sweep is not None:
            relay.quiet_since = time.monotonic()
            route.idle_relays.add(relay)
            idle_sweep.arm()
        relay.start()

    def _message_relay(self, client: socket.socket, target: socket.socket, route: Route) -> Relay:
        buffer = self.worker.message_buffer
        assert buffer is not None  # made for the worker's sequential-packet listeners
        return MessageRelay(
            self.poller,
            route.pool,
            buffer,
            client,
            target,
            self.slot,
            BYTES_TO_TARGET,
            BYTES_TO_CLIENT,
            route.on_relay_closed,
            route.idle_sweep is not None,
        )

    def _send_proxy_header(
        self, pending: _PendingClient, target: socket.socket, encode: HeaderEncoder
    ) -> bool:
        """--proxy-protocol: the header first, in one send(2); False if that failed."""
        client = pending.client
        family = client.family
        try:
            local = client.getsockname() if family in TCP_FAMILIES else None
            send_proxy_header(target, encode(pending.peer, local, family))
        except OSError as error:
            target.close()
            reason = f"sending the PROXY protocol header: {error.strerror or error}"
            self.on_connect_failed(pending, OSError(error.errno, reason))
            return False
        return True

    def on_connect_failed(self, pending: _PendingClient, error: OSError) -> None:
        pending.connect = None
        if error.errno in _RETRY_PAUSE_ERRNOS and not self.worker.draining:
            # socket() found no free descriptor. Closing this client and going on
            # accepting would drop every client in the backlog at full speed; keep it, leave
            # the rest in the backlog, and try again once descriptors may be free.
            acceptor = self.worker.acceptor
            acceptor.failures.log(
                "cannot open a connection to upstream %s: %s; pausing accepts for %gs",
                pending.route.group.label,
                error.strerror or error,
                ACCEPT_PAUSE,
            )
            acceptor.pause()
            self.loop.call_later(ACCEPT_PAUSE, self._retry_connect, pending)
            return
        self.pending.discard(pending)
        self.slot[CONNECT_ERRORS] += 1
        self.connect_failures.log(
            "cannot connect to upstream %s for %s: %s, closing connection",
            pending.route.group.label,
            format_sockaddr(pending.client.family, pending.peer),
            error.strerror or error,
        )
        pending.client.close()
        self.connection_ended(pending.token)

    def _retry_connect(self, pending: _PendingClient) -> None:
        if pending not in self.pending:
            return  # closed meanwhile by the graceful timeout
        self._start_connect(pending)

    # -- relaying and closing ------------------------------------------------------------

    def on_relay_closed(self, relay: Relay) -> None:
        self.relays.discard(relay)
        error = relay.error
        if error is not None and error.errno not in PEER_GONE_ERRNOS:
            self.relay_failures.log(
                "connection from %s failed: %s, closing connection",
                format_sockaddr(relay.client.family, relay.peer),
                error,
            )
        _observe(
            self.slot,
            CONNECTION_DURATION_BUCKETS,
            CONNECTION_DURATION_BOUNDS,
            CONNECTION_DURATION_SUM_NS,
            time.monotonic() - relay.started,
        )
        self.connection_ended(relay.token)

    def close_all(self) -> None:
        """The graceful timeout: close every connection still connecting or relaying."""
        for pending in list(self.pending):
            if pending.connect is not None:
                pending.connect.cancel()
            pending.client.close()
            self.pending.discard(pending)
            self.connection_ended(pending.token)
        for relay in list(self.relays):
            relay.close()


def _observe(
    slot: memoryview, first_bucket: int, bounds: tuple[float, ...], sum_field: int, seconds: float
) -> None:
    slot[first_bucket + bisect_left(bounds, seconds)] += 1
    slot[sum_field] += int(seconds * 1e9)
