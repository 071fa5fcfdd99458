"""A worker's admitted clients on their way to a relay: connect, time out, fail, retry.

`Connector` opens each admitted client's connection to the target group of its
listener's `Route` (plans.py, balance.py, targets.py, target_connect.py) without
blocking, keeps the clients whose connect is under way as `PendingClient`s (pending.py)
for the --connect-timeout sweep, sends the PROXY header when the route asks, and hands
both sockets to a `Relay` (splice.py), which its `OpenRelays` (relaying.py) keeps until
it closes (a route's --idle-timeout sweep watches its own). A connect that fails closes
its client with one warning; one that found no free descriptor keeps its client and
pauses accepting instead. Never accepts or admits.

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
from forkproxy.relay.accept_proxy import Carried
from forkproxy.relay.accepting import ACCEPT_PAUSE
from forkproxy.relay.access_log import Trail, connect_end
from forkproxy.relay.access_log_format import END_CONNECT_FAILED, END_STOPPED
from forkproxy.relay.balance import Balancer
from forkproxy.relay.failpoints import Failpoint
from forkproxy.relay.handover import new_relay
from forkproxy.relay.internal_error import INTERNAL_ERROR, InternalErrors
from forkproxy.relay.pending import PendingClient
from forkproxy.relay.plans import Route, min_connect_timeout, spare_row
from forkproxy.relay.proxy_protocol import HeaderEncoder
from forkproxy.relay.refusals import NO_TARGET
from forkproxy.relay.relaying import OpenRelays, observe
from forkproxy.relay.splice import NO_TOKEN, Relay, reset_on_close
from forkproxy.relay.target_connect import TCP_FAMILIES, send_proxy_header
from forkproxy.relay.targets import COOLDOWN
from forkproxy.relay.timeouts import LazySweep, sweep_connects, sweep_interval
from forkproxy.settings.address import TargetAddress, format_sockaddr
from forkproxy.settings.kinds import SEQPACKET
from forkproxy.shared.scoreboard import (
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


class Connector:
    """Connects a worker's admitted clients and hands them to their relays."""

    def __init__(self, worker: "Worker", failpoint: Failpoint | None = None) -> None:
        self.worker = worker  # draining or not; its acceptor, paused when short of fds
        self.config = worker.config
        self.loop = worker.loop
        self.poller = worker.poller
        self.slot = worker.slot
        self.connection_ended = worker.connection_ended
        self.pending: set[PendingClient] = set()
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
        trail: Trail | None = None,
        carried: Carried | None = None,
    ) -> None:
        """Take over an admitted client and connect it to `route`'s targets (`counters`:
        its listener's row in the worker's slot; `trail`: its access-log line; `carried`:
        what its PROXY header said). Never raises."""
        if counters is None:
            counters = spare_row()
        pending = PendingClient(self, client, token, peer, route, counters, trail, carried)
        self.pending.add(pending)
        self._start_connect(pending)

    def _start_connect(self, pending: PendingClient) -> None:
        try:
            carried = pending.carried
            # --balance source: by the client's address, the one its PROXY header carried.
            family, peer = (pending.client.family, pending.peer) if carried is None else carried[:2]
            attempt = pending.route.group.connect(
                self.loop, self.poller, pending.on_connected, pending.on_failed, family, peer
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
        self, pending: PendingClient, target: socket.socket, index: int = -1
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
            if pending.trail is not None:  # the target as written, when the balancer's
                pending.trail.connected(target, group.targets[index].text if index >= 0 else "")
            seqpacket = group.targets[0].kind == SEQPACKET
            # Messages: no PROXY header (a stream's), and no splice (it would merge them).
            if (
                not seqpacket
                and proxy_header is not None
                and not self._send_proxy_header(pending, target, proxy_header, index)
            ):
                return
            relay = new_relay(self.worker, route, pending.client, target, index, self.failpoint)
            # From here the relay owns both sockets and the admission.
            relay.token = pending.token
            pending.token = NO_TOKEN
            relay.started = pending.started
            relay.peer = pending.peer
            if pending.trail is not None:
                relay.log_end = pending.trail.relay_ended
            self.open.add(relay)
            idle_sweep = route.idle_sweep
            if idle_sweep is not None:
                relay.quiet_since = time.monotonic()
                route.idle_relays.add(relay)
                idle_sweep.arm()
            failpoint = self.failpoint
            if failpoint is not None and failpoint.due("connected"):
                raise failpoint.fault()
            relay.start()
        except Exception as error:
            if relay is None:
                target.close()
                self.crashed(pending, error)
            else:
                self.crashed(relay, error)

    def _send_proxy_header(
        self, pending: PendingClient, target: socket.socket, encode: HeaderEncoder, index: int
    ) -> bool:
        """--proxy-protocol: the header first, in one send(2); False if that failed."""
        client = pending.client
        family: int = client.family
        peer: object
        local: object
        try:
            if pending.carried is not None:  # --accept-proxy: pass on what came to us
                family, peer, local = pending.carried
            else:
                peer = pending.peer
                local = client.getsockname() if family in TCP_FAMILIES else None
            send_proxy_header(target, encode(peer, local, family))
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

    def on_connect_failed(self, pending: PendingClient, error: OSError) -> None:
        """Every target failed: close the client (or retry it later). Never raises."""
        if pending in self.pending:  # else released meanwhile, after an internal error
            self._connect_failed(pending, error)

    def _connect_failed(self, pending: PendingClient, error: OSError) -> None:
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
        # ECONNRESET: the target accepted, then aborted before the connect was seen done:
        # the client gets the abort too, as it would have while relaying.
        self._abandon(pending, abort=error.errno == errno.ECONNRESET, end=connect_end(error))

    def _retry_connect(self, pending: PendingClient) -> None:
        if pending not in self.pending:
            return  # closed meanwhile by the graceful timeout
        self._start_connect(pending)

    def _abandon(self, pending: PendingClient, abort: bool, end: str) -> None:
        """Release what a client not (or no longer) relayed holds, each thing once: its
        connect attempt, its socket (closed, with an RST if `abort`), its admission; its
        access-log line says `end`."""
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
                if pending.trail is not None:
                    pending.trail.finish(end)
        finally:
            if token != NO_TOKEN:
                self.connection_ended(token)

    def close_all(self) -> None:
        """The graceful timeout: close every connection still connecting, abort every
        relay."""
        for pending in list(self.pending):
            try:
                self._abandon(pending, abort=False, end=END_STOPPED)
            except Exception as error:
                self.crashed(pending, error)
        self.open.abort_all()

    # -- internal errors -----------------------------------------------------------------

    def owner_of(self, fd: int) -> "Relay | PendingClient | None":
        """The connection whose socket is `fd`, if any (looked up only after an error)."""
        relay = self.open.owner_of(fd)
        if relay is not None:
            return relay
        for pending in self.pending:
            attempt = pending.connect
            if attempt is not None and attempt.fileno() == fd:
                return pending
        return None

    def crashed(self, connection: "Relay | PendingClient", error: Exception) -> None:
        """An exception escaped from `connection`'s code: one warning, and everything it
        holds released, the connection aborted (an RST to its peers). Never raises."""
        peer = format_sockaddr(connection.client.family, connection.peer)
        self.internal_errors.report(f"on the connection from {peer}", error)
        try:
            if isinstance(connection, Relay):
                connection.salvage(INTERNAL_ERROR)
            else:
                self._abandon(connection, abort=True, end=END_CONNECT_FAILED)
        except Exception as again:
            self.internal_errors.report_other(f"releasing the connection from {peer}", again)
