"""A worker's open relays, from their hand-over by the connector until they close.

`OpenRelays` keeps each `Relay` (splice.py) the connector hands it; when one closes it
returns its admission through `connection_ended`, records its duration and logs an
error that was not a peer going away. It aborts them all at the graceful timeout (the
--idle-timeout sweeps are each route's, plans.py). Never connects, accepts or admits.
"""

import logging
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING

from forkproxy import logs
from forkproxy.relay.splice import NO_TOKEN, PEER_GONE_ERRNOS, Relay
from forkproxy.relay.timeouts import GRACEFUL_ERROR
from forkproxy.settings.address import format_sockaddr
from forkproxy.shared.layout import T_ACTIVE
from forkproxy.shared.scoreboard import (
    CONNECTION_DURATION_BOUNDS,
    CONNECTION_DURATION_BUCKETS,
    CONNECTION_DURATION_SUM_NS,
)

if TYPE_CHECKING:
    from forkproxy.relay.worker import Worker

log = logging.getLogger("forkproxy")


class OpenRelays:
    """The relays of a worker, each from `add` until its `on_relay_closed`."""

    def __init__(self, worker: "Worker", crashed: Callable[[Relay, Exception], None]) -> None:
        self.slot = worker.slot
        self.connection_ended = worker.connection_ended
        self.crashed = crashed  # the connector's: an exception escaped from a relay
        self.relays: set[Relay] = set()
        self.failures = logs.RateLimitedLog(log, logging.WARNING)

    def add(self, relay: Relay) -> None:
        """`relay` holds a connection's sockets and admission: ours until it closes."""
        self.relays.add(relay)

    def on_relay_closed(self, relay: Relay) -> None:
        """A relay's `on_close`: give its admission back, exactly once whatever else fails."""
        self.relays.discard(relay)
        token = relay.token
        relay.token = NO_TOKEN
        relay.target_row[T_ACTIVE] -= 1  # the connector counted it open with the relay
        try:
            error = relay.error
            if error is not None and error.errno not in PEER_GONE_ERRNOS:
                self.failures.log(
                    "connection from %s failed: %s, closing connection",
                    format_sockaddr(relay.client.family, relay.peer),
                    error,
                )
            elif error is not None:  # a reset passed on, or a timeout: a normal end
                log.debug(
                    "connection from %s ended: %s",
                    format_sockaddr(relay.client.family, relay.peer),
                    error,
                )
            observe(
                self.slot,
                CONNECTION_DURATION_BUCKETS,
                CONNECTION_DURATION_BOUNDS,
                CONNECTION_DURATION_SUM_NS,
                time.monotonic() - relay.started,
            )
        finally:
            if token != NO_TOKEN:
                self.connection_ended(token)

    def abort_all(self) -> None:
        """The graceful timeout: abort every open relay (an RST to both peers)."""
        for relay in list(self.relays):
            try:
                relay.fail(GRACEFUL_ERROR)
            except Exception as error:
                self.crashed(relay, error)

    def owner_of(self, fd: int) -> Relay | None:
        """The relay one of whose sockets is `fd` (looked up only after an error)."""
        for relay in self.relays:
            if fd == relay.client_to_target.src_fd or fd == relay.target_to_client.src_fd:
                return relay
        return None


def observe(
    slot: memoryview, first_bucket: int, bounds: tuple[float, ...], sum_field: int, seconds: float
) -> None:
    """Count `seconds` in a scoreboard histogram."""
    slot[first_bucket + bisect_left(bounds, seconds)] += 1
    slot[sum_field] += int(seconds * 1e9)
