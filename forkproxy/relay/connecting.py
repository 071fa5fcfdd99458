"""A worker's admitted clients on their way to a relay: connect, time out, fail, retry.

`Connector` opens each admitted client's connection to the target group of its
listener's `Route` (plans.py, targets.py, target_connect.py) without blocking, keeps
the clients whose connect is under way as `_PendingClient`s for the --connect-timeout
sweep, sends the PROXY header when the route asks, and hands both sockets to a `Relay`
(splice.py), which its `OpenRelays` (relaying.py) keeps until it closes (a route's
--idle-timeout sweep watches its own). A connect that fails closes its client with one
warning; one that found no free descriptor keeps its client and pauses accepting
instead. Never accepts or admits.

From `connect()` on, the connector owns the client: its socket and its admission (one
token for the global and the per-source caps) are released exactly once however the
connection ends, through `connection_ended`. An exception escaping the code of one
connection (a connect callback, a sweep, a relay's callback through the poller) ends
that connection as an abort (`crashed`, internal_error.py); the others go on.
"""

import errno
import logging
import math
import socket
import time
from typing import TYPE_CHECKING

from forkproxy import logs
from forkproxy.relay.accepting import ACCEPT_PAUSE
from forkproxy.relay.balance import BalancedConnect, Balancer
from forkproxy.relay.failpoints import FailingDirection, Failpoint
from forkproxy.relay.internal_error import INTERNAL_ERROR, InternalErrors
from forkproxy.relay.plans import Route, min_connect_timeout, spare_row
from forkproxy.relay.proxy_protocol import HeaderEncoder
from forkproxy.relay.refusals import NO_TARGET
from forkproxy.relay.relaying import OpenRelays, observe
from forkproxy.relay.seqpacket import MessageRelay
from forkproxy.relay.splice import NO_TOKEN, Relay, reset_on_close
from forkproxy.relay.target_connect import TCP_FAMILIES, TargetConnect, send_proxy_header
from forkproxy.relay.targets import COOLDOWN, FailoverConnect
from forkproxy.relay.timeouts import LazySweep, sweep_connects, sweep_interval
from forkproxy.settings.address import TargetAddress, format_sockaddr
from forkproxy.settings.kinds import SEQPACKET
from forkproxy.shared.layout import T_ACTIVE, T_CONNECTIONS
from forkproxy.shared.scoreboard import (
    BYTES_TO_CLIENT,
    BYTES_TO_TARGET,
    CONNECT_DURATION_BOUNDS,
    CONNECT_DURATION_BUCKETS,
    CONNECT_DURATION_SUM_NS,
    CONNECT_ERRORS,
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
        "counters",
    )

    def __init__(
        self,
        connector: "Connector",
        client: socket.socket,
        token: int,
        peer: object,
        route: Route,
        counters: memoryview,
    ) -> None:
        self.connector = connector
        self.client = client
        # Its admission, for Admitter.release; NO_TOKEN once given back or handed over
        # to the connection's relay.
        self.token = token
        self.started = time.monotonic()
        self.peer = peer
        self.connect: TargetConnect | FailoverConnect | BalancedConnect | None = None
        self.route = route  # its listener's: target group, PROXY header, pipes
        self.counters = counters  # its listener's row in the worker's slot

    def on_connected(self, target: socket.socket, index: int = -1) -> None:
        """Connected to target `index` of its route's balancer (-1: a `TargetGroup`'s)."""
        self.connector.on_target_connected(self, target, index)

    def on_failed(self, error: OSError) -> None:
        self.connector.on_connect_failed(self, error)


class Connector:
    """Connects a worker's admitted clients and hands them to their relays."""

    def __init__(self, worker: "Worker", failpoint: Failpoint | None = None) -> None:
        self.worker = worker  # draining or not; its acceptor, paused when short of fds
        self.config = worker.config
        self.loop = worker.loop
        self.poller = worker.poller
        self.slot = worker.slot
        self.connection_ended = worker.connection_ended
        self.pending: set[_PendingClient] = set()
        self.open = OpenRelays(worker, self.crashed)
        self.relays = self.open.relays
        self.on_relay_closed = self.open.on_relay_closed  # where each route's relays end
        self.connect_failures = logs.RateLimitedLog(log, logging.WARNING)
        self.target_failures = logs.RateLimitedLog(log, logging.WARNING)
        self.internal_errors = InternalErrors(log)
        self.failpoint = failpoint  # tests only (failpoints.py); None otherwise
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
        counters: memoryview | None = None,
    ) -> None:
        """Take over an admitted client and connect it to `route`'s targets (`counters`:
        its listener's row in the worker's slot). Never raises."""
        if counters is None:
            counters = spare_row()
        pending = _PendingClient(self, client, token, peer, route, counters)
        self.pending.add(pending)
        self._start_connect(pending)

    def _start_connect(self, pending: _PendingClient) -> None:
        try:
            attempt = pending.route.group.connect(
                self.loop,
                self.poller,
                pending.on_connected,
                pending.on_failed,
                pending.client.family,
                pending.peer,
            )
            # On loopback the connect usually ended (on_target_connected or
            # on_connect_failed ran) inside group.connect(): only an attempt still under
            # way is kept and timed.
            if pending in self.pending and pending.connect is None:
                pending.connect = attempt
                sweep = self.connect_sweep
                if sweep is not None and not sweep.armed:
                    sweep.arm()
        except Exception as error:
            self.crashed(pending, error)

    def _sweep_connects(self, now: float) -> None:
        attempts = [p.connect for p in self.pending if p.connect is not None]
        sweep_connects(attempts, now, self._on_sweep_error)

    def _on_sweep_error(self, attempt: object, error: Exception) -> None:
        for pending in self.pending:
            if pending.connect is attempt:
                self.crashed(pending, error)
                return
        self.internal_errors.report_other("in the connect sweep", error)

    def on_target_failed(self, target: TargetAddress, error: OSError, newly: bool) -> None:
        if newly:
            self.target_failures.log(
                "cannot connect to target '%s': %s; trying the other targets, and it only "
                "after them for %gs",
                target.text,
                error.strerror or error,
                COOLDOWN,
            )

    def on_target_connected(
        self, pending: _PendingClient, target: socket.socket, index: int = -1
    ) -> None:
        """The attempt connected: hand client and target over to a new relay. Never raises."""
        if pending not in self.pending:  # released meanwhile, after an internal error
            target.close()
            return
        self.pending.discard(pending)
        pending.connect = None  # it holds our bound methods: no cycle left to the collector
        relay = None
        try:
            slot = self.slot
            observe(
                slot,
                CONNECT_DURATION_BUCKETS,
                CONNECT_DURATION_BOUNDS,
                CONNECT_DURATION_SUM_NS,
                time.monotonic() - pending.started,
            )
            route = pending.route
            proxy_header = route.proxy_header
            group = route.group
            seqpacket = group.targets[0].kind == SEQPACKET
            # Messages: no PROXY header (a stream's), and no splice (it would merge them).
            if (
                not seqpacket
                and proxy_header is not None
                and not self._send_proxy_header(pending, target, proxy_header, index)
            ):
                return
            # The worker's row of counters for the target, if it has one.
            target_row = group.counters[index] if isinstance(group, Balancer) else None
            direction = route.direction
            failpoint = self.failpoint
            if failpoint is not None and failpoint.due("readable"):
                direction = FailingDirection
            if seqpacket:
                relay = self._message_relay(pending.client, target, route, target_row)
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
                    direction,
                    target_row,
                )
            # Open until the relay closes (OpenRelays.on_relay_closed), however it ends.
            row = relay.target_row
            row[T_CONNECTIONS] += 1
            row[T_ACTIVE] += 1
            # From here the relay owns both sockets and the admission.
            relay.token = pending.token
            pending.token = NO_TOKEN
            relay.started = pending.started
            relay.peer = pending.peer
            self.open.add(relay)
            idle_sweep = route.idle_sweep
            if idle_sweep is not None:
                relay.quiet_since = time.monotonic()
                route.idle_relays.add(relay)
                idle_sweep.arm()
            if failpoint is not None and failpoint.due("connected"):
                raise failpoint.fault()
            relay.start()
        except Exception as error:
            if relay is None:
                target.close()
                self.crashed(pending, error)
            else:
                self.crashed(relay, error)

    def _message_relay(
        self,
        client: socket.socket,
        target: socket.socket,
        route: Route,
        target_row: memoryview | None,
    ) -> Relay:
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
            target_row,
        )

    def _send_proxy_header(
        self, pending: _PendingClient, target: socket.socket, encode: HeaderEncoder, index: int
    ) -> bool:
        """--proxy-protocol: the header first, in one send(2); False if that failed."""
        client = pending.client
        family = client.family
        try:
            local = client.getsockname() if family in TCP_FAMILIES else None
            send_proxy_header(target, encode(pending.peer, local, family))
        except Exception as error:  # ValueError from the encoder too: a failed connect
            target.close()
            text = error.strerror if isinstance(error, OSError) else None
            reason = f"sending the PROXY protocol header: {text or error}"
            code = error.errno if isinstance(error, OSError) else errno.EINVAL
            group = pending.route.group
            if isinstance(group, Balancer):  # a failed attempt of that target
                group.count_error(index, code)
            self._connect_failed(pending, OSError(code, reason))
            return False
        return True

    def on_connect_failed(self, pending: _PendingClient, error: OSError) -> None:
        """Every target failed: close the client (or retry it later). Never raises."""
        if pending in self.pending:  # else released meanwhile, after an internal error
            self._connect_failed(pending, error)

    def _connect_failed(self, pending: _PendingClient, error: OSError) -> None:
        pending.connect = None
        try:
            if error.errno in _RETRY_PAUSE_ERRNOS and not self.worker.draining:
                # socket() found no free descriptor. Closing this client and going on
                # accepting would drop every client in the backlog at full speed; keep it,
                # leave the rest in the backlog, and try again once descriptors may be free.
                acceptor = self.worker.acceptor
                acceptor.failures.log(
                    "cannot open a connection to target %s: %s; pausing accepts for %gs",
                    pending.route.group.label,
                    error.strerror or error,
                    ACCEPT_PAUSE,
                )
                acceptor.pause()
                self.pending.add(pending)  # still, or again after a failed PROXY header
                self.loop.call_later(ACCEPT_PAUSE, self._retry_connect, pending)
                return
            if not isinstance(pending.route.group, Balancer):
                self.slot[CONNECT_ERRORS] += 1  # a balancer counts each failed attempt
            pending.counters[NO_TARGET] += 1
            self.connect_failures.log(
                "cannot connect to target %s for %s: %s, closing connection",
                pending.route.group.label,
                format_sockaddr(pending.client.family, pending.peer),
                error.strerror or error,
            )
        except Exception as crash:
            self.crashed(pending, crash)
            return
        self._abandon(pending, abort=False)

    def _retry_connect(self, pending: _PendingClient) -> None:
        if pending not in self.pending:
            return  # closed meanwhile by the graceful timeout
        self._start_connect(pending)

    def _abandon(self, pending: _PendingClient, abort: bool) -> None:
        """Release what a client not (or no longer) relayed holds, each thing once: its
        connect attempt, its socket (closed, with an RST if `abort`), its admission."""
        self.pending.discard(pending)
        attempt = pending.connect
        pending.connect = None
        token = pending.token
        pending.token = NO_TOKEN
        try:
            if attempt is not None:
                attempt.cancel()
            if token != NO_TOKEN:  # else the client is its relay's now, or closed already
                if abort:
                    reset_on_close(pending.client)
                pending.client.close()
        finally:
            if token != NO_TOKEN:
                self.connection_ended(token)

    def close_all(self) -> None:
        """The graceful timeout: close every connection still connecting, abort every
        relay."""
        for pending in list(self.pending):
            try:
                self._abandon(pending, abort=False)
            except Exception as error:
                self.crashed(pending, error)
        self.open.abort_all()

    # -- internal errors -----------------------------------------------------------------

    def owner_of(self, fd: int) -> "Relay | _PendingClient | None":
        """The connection whose socket is `fd`, if any (looked up only after an error)."""
        relay = self.open.owner_of(fd)
        if relay is not None:
            return relay
        for pending in self.pending:
            attempt = pending.connect
            if attempt is not None and attempt.fileno() == fd:
                return pending
        return None

    def crashed(self, connection: "Relay | _PendingClient", error: Exception) -> None:
        """An exception escaped from `connection`'s code: one warning, and everything it
        holds released, the connection aborted (an RST to its peers). Never raises."""
        peer = format_sockaddr(connection.client.family, connection.peer)
        self.internal_errors.report(f"on the connection from {peer}", error)
        try:
            if isinstance(connection, Relay):
                connection.salvage(INTERNAL_ERROR)
            else:
                self._abandon(connection, abort=True)
        except Exception as again:
            self.internal_errors.report_other(f"releasing the connection from {peer}", again)
