"""--accept-proxy: the PROXY header a balancer sends first, read before any target is contacted.

`AcceptProxy` is one listener's policy: which peers may send a header
(--accept-proxy-from) and what becomes of the others (--accept-proxy-untrusted).
`HeaderReaders` keeps a worker's admitted clients while their header arrives: it peeks
at what came, parses it (proxy_header.py) and takes exactly the header's bytes off the
socket, so whatever the client sent after it stays there and is relayed like any other
byte. The client's address is then the carried one (a v2 LOCAL, a v1 UNKNOWN: its own)
for the per-source limit, the access log and the --proxy-protocol header sent on. A
header that is malformed, too long, or not whole at EOF or after --accept-proxy-timeout
closes the connection with nothing sent to a target, counted by reason in the slot's
PROXY_HEADER_ERRORS. Never connects or relays.

A client holds its unit of the global cap from accept (it holds descriptors already);
its source is counted once the header said who it is (`Admitter.admit_source`).
"""

import logging
import math
import socket
import time
from collections.abc import Iterable
from ipaddress import ip_address
from typing import TYPE_CHECKING

from forkproxy import logs
from forkproxy.relay.access_log import Trail
from forkproxy.relay.access_log_format import (
    END_PROXY_HEADER_ERROR,
    END_REFUSED_PER_SOURCE,
    END_STOPPED,
)
from forkproxy.relay.proxy_header import (
    REASONS,
    TIMEOUT,
    TRUNCATED,
    V2_MAX_LENGTH,
    HeaderError,
    NeedMore,
    ProxyHeader,
    parse,
)
from forkproxy.relay.refusals import PROXY_HEADER, REFUSAL_WORDS, Refusals
from forkproxy.relay.splice import NO_TOKEN
from forkproxy.relay.timeouts import LazySweep, sweep_interval
from forkproxy.settings.address import format_sockaddr
from forkproxy.settings.config import IPNetwork, ListenerSettings
from forkproxy.shared.admission import REFUSED_BUSY, REFUSED_SOURCE
from forkproxy.shared.layout import PROXY_HEADER_ERRORS, PROXY_HEADER_REASONS_MAX
from forkproxy.shared.per_source import source_key
from forkproxy.shared.scoreboard import REFUSED

if TYPE_CHECKING:
    from forkproxy.relay.plans import ListenerPlan
    from forkproxy.relay.worker import Worker

log = logging.getLogger("forkproxy")

UNTRUSTED = "untrusted"  # a peer outside --accept-proxy-from, with =reject
# The `reason` label of forkproxy_proxy_header_errors_total, by word of the slot.
METRIC_REASONS = (*REASONS, UNTRUSTED)
assert len(METRIC_REASONS) <= PROXY_HEADER_REASONS_MAX

# What accepting does with a client of an --accept-proxy listener.
READ_HEADER = 0
DIRECT = 1  # untrusted, =direct: relayed under its own address, a header in it is data
REJECT = 2  # untrusted, =reject: closed at once
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
BUSY_RETRY_INTERVAL = 0.01  # seconds to the next try of a busy admission mutex (as accepting.py)

# (family, source, destination) a header carried
Carried = tuple[int, tuple[str, int], tuple[str, int]]


class AcceptProxy:
    """One listener's --accept-proxy settings."""

    __slots__ = ("networks", "direct", "timeout")

    def __init__(self, settings: ListenerSettings) -> None:
        self.networks: tuple[IPNetwork, ...] = settings.accept_proxy_from  # (): everyone
        self.direct = settings.accept_proxy_untrusted == "direct"
        self.timeout = settings.accept_proxy_timeout

    def decide(self, family: int, peer: object) -> int:
        """READ_HEADER, DIRECT or REJECT for a client from `peer`."""
        if not self.networks:
            return READ_HEADER
        if family in _TCP_FAMILIES and isinstance(peer, tuple):
            address = ip_address(peer[0].partition("%")[0])
            mapped = getattr(address, "ipv4_mapped", None)
            for network in self.networks:
                if address in network or (mapped is not None and mapped in network):
                    return READ_HEADER
        return DIRECT if self.direct else REJECT


class _Reading:
    """An admitted client whose PROXY header has not all come yet."""

    __slots__ = ("client", "fd", "token", "peer", "plan", "data", "deadline", "trail")

    def __init__(
        self,
        client: socket.socket,
        token: int,
        peer: object,
        plan: "ListenerPlan",
        deadline: float,
        trail: Trail | None,
    ) -> None:
        self.client = client
        self.fd = client.fileno()
        self.token = token  # its unit of the cap; NO_TOKEN once handed on or released
        self.peer = peer
        self.plan = plan
        self.data = b""  # the header's bytes taken off the socket so far
        self.deadline = deadline
        self.trail = trail


class HeaderReaders:
    """A worker's clients while their PROXY header arrives."""

    def __init__(self, worker: "Worker", refusals: Refusals, timeouts: Iterable[float]) -> None:
        self.worker = worker  # its connection_ended: a client's admission goes back
        self.refusals = refusals
        self.loop = worker.loop
        self.poller = worker.poller
        self.slot = worker.slot
        self.admitter = worker.admitter
        self.connect = worker.connector.connect
        self.internal_errors = worker.connector.internal_errors
        self.readings: dict[int, _Reading] = {}  # by fd
        self.errors = logs.RateLimitedLog(log, logging.WARNING)
        self.sweep: LazySweep | None = None
        shortest = min(timeouts, default=math.inf)
        if shortest != math.inf:
            self.sweep = LazySweep(
                self.loop, sweep_interval(shortest), self.readings, self._on_sweep
            )

    def __len__(self) -> int:
        return len(self.readings)

    def reject(self, fd: int, family: int, peer: object, plan: "ListenerPlan") -> None:
        """An untrusted peer (--accept-proxy-untrusted=reject): closed at once."""
        self._count(UNTRUSTED, plan)
        socket.close(fd)
        self.errors.log(
            "connection from %s, outside --accept-proxy-from, closed",
            format_sockaddr(family, peer),
        )
        if plan.log is not None:
            plan.log.refused(family, peer, END_PROXY_HEADER_ERROR)

    def start(
        self,
        client: socket.socket,
        token: int,
        peer: object,
        plan: "ListenerPlan",
        trail: Trail | None,
    ) -> None:
        """Take over an admitted client and wait for its header. Never raises."""
        assert plan.accept_proxy is not None
        reading = _Reading(
            client, token, peer, plan, time.monotonic() + plan.accept_proxy.timeout, trail
        )
        self.readings[reading.fd] = reading
        try:
            self.poller.add_reader(reading.fd, lambda: self._on_readable(reading))
            if self.sweep is not None:
                self.sweep.arm()
        except Exception as error:
            self._crashed(reading, error)

    def _on_readable(self, reading: _Reading) -> None:
        try:
            self._read(reading)
        except Exception as error:
            self._crashed(reading, error)

    def _read(self, reading: _Reading) -> None:
        client = reading.client
        try:
            # Peek, then take only the header off: the bytes after it stay to be relayed.
            peeked = client.recv(V2_MAX_LENGTH - len(reading.data), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._fail(reading, TRUNCATED)  # reset before the header was whole
            return
        if not peeked:
            self._fail(reading, TRUNCATED)
            return
        data = reading.data + peeked
        result = parse(data)
        if isinstance(result, HeaderError):
            self._fail(reading, result.reason)
            return
        # Take off what was peeked: all of it while the header is not whole, else the rest
        # of the header alone (the kernel holds them: no wait, no short read).
        taken = len(peeked) if isinstance(result, NeedMore) else result.length - len(reading.data)
        if len(client.recv(taken)) != taken:
            self._fail(reading, TRUNCATED)
        elif isinstance(result, NeedMore):
            reading.data = data
        else:
            self._done(reading, result)

    def _forget(self, reading: _Reading) -> None:
        del self.readings[reading.fd]
        self.poller.remove_reader(reading.fd)

    def _done(self, reading: _Reading, header: ProxyHeader) -> None:
        """A whole header: count the source, then connect as any client."""
        plan = reading.plan
        carried: Carried | None = None
        family: int = plan.family
        peer: object = reading.peer
        if header.source is not None and header.destination is not None:
            family, peer = header.family, header.source
            carried = (header.family, header.source, header.destination)
            if reading.trail is not None:
                reading.trail.client = format_sockaddr(family, peer)
        token = reading.token
        key = source_key(family, peer) if plan.source_limit else None
        if key is not None:
            row = self.admitter.admit_source(key, plan.source_limit)
            if row == REFUSED_BUSY:  # our own contention, not a limit: again soon
                self.poller.remove_reader(reading.fd)  # its header is read
                self.loop.call_later(BUSY_RETRY_INTERVAL, self._retry, reading, header)
                return
            if row == REFUSED_SOURCE:
                self._forget(reading)
                self._refuse(reading, family, peer)
                return
            if row >= 0:
                token = row
        self._forget(reading)
        reading.token = NO_TOKEN
        self.connect(
            reading.client, token, reading.peer, plan.route, plan.counters, reading.trail, carried
        )

    def _retry(self, reading: _Reading, header: ProxyHeader) -> None:
        if self.readings.get(reading.fd) is reading:  # else timed out or stopped meanwhile
            try:
                self._done(reading, header)
            except Exception as error:
                self._crashed(reading, error)

    def _refuse(self, reading: _Reading, family: int, peer: object) -> None:
        """The carried source has its limit."""
        self.slot[REFUSED] += 1
        reading.plan.counters[REFUSAL_WORDS[REFUSED_SOURCE]] += 1
        self.refusals.log_refusal(family, peer, REFUSED_SOURCE, reading.plan.source_limit)
        self._close(reading, END_REFUSED_PER_SOURCE)

    def _fail(self, reading: _Reading, reason: str) -> None:
        self._forget(reading)
        self._count(reason, reading.plan)
        self.errors.log(
            "bad PROXY protocol header from %s: %s, closing connection",
            format_sockaddr(reading.plan.family, reading.peer),
            reason,
        )
        self._close(reading, END_PROXY_HEADER_ERROR)

    def _count(self, reason: str, plan: "ListenerPlan") -> None:
        """A bad header (or an untrusted peer): by reason, and a refusal of its listener."""
        self.slot[PROXY_HEADER_ERRORS + METRIC_REASONS.index(reason)] += 1
        plan.counters[PROXY_HEADER] += 1

    def _close(self, reading: _Reading, end: str) -> None:
        token = reading.token
        reading.token = NO_TOKEN
        try:
            reading.client.close()
            if reading.trail is not None:
                reading.trail.finish(end)
        finally:
            if token != NO_TOKEN:
                self.worker.connection_ended(token)

    def _on_sweep(self, now: float) -> None:
        for reading in [one for one in self.readings.values() if one.deadline <= now]:
            try:
                self._fail(reading, TIMEOUT)
            except Exception as error:
                self._crashed(reading, error)

    def close_all(self) -> None:
        """The graceful timeout: close every client still sending its header."""
        for reading in list(self.readings.values()):
            try:
                self._forget(reading)
                self._close(reading, END_STOPPED)
            except Exception as error:
                self._crashed(reading, error)

    def _crashed(self, reading: _Reading, error: Exception) -> None:
        peer = format_sockaddr(reading.plan.family, reading.peer)
        self.internal_errors.report(f"reading the PROXY header from {peer}", error)
        self.readings.pop(reading.fd, None)
        try:
            self.poller.forget(reading.fd)
            self._close(reading, END_PROXY_HEADER_ERROR)
        except Exception as again:
            self.internal_errors.report_other(f"releasing the connection from {peer}", again)
