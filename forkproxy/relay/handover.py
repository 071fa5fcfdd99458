"""A connected client and target handed over to the relay that moves their bytes.

The relay is a splice `Relay` for a stream and a `MessageRelay` (seqpacket.py) for
sequential packets, whose boundaries a splice would merge. It is counted open in its
target's row of the worker's slot from here until it closes (relaying.py). Never logs,
never connects.
"""

import socket
from typing import TYPE_CHECKING

from forkproxy.relay.balance import Balancer
from forkproxy.relay.failpoints import FailingDirection, Failpoint
from forkproxy.relay.plans import Route
from forkproxy.relay.seqpacket import MessageRelay
from forkproxy.relay.splice import Relay
from forkproxy.settings.kinds import SEQPACKET
from forkproxy.shared.layout import T_ACTIVE, T_CONNECTIONS
from forkproxy.shared.scoreboard import BYTES_TO_CLIENT, BYTES_TO_TARGET

if TYPE_CHECKING:
    from forkproxy.relay.worker import Worker


def new_relay(
    worker: "Worker",
    route: Route,
    client: socket.socket,
    target: socket.socket,
    index: int,
    failpoint: Failpoint | None,
) -> Relay:
    """The relay of `client` and `target` (target `index` of the route's balancer; -1: a
    `TargetGroup`'s), not started yet."""
    group = route.group
    target_row = group.counters[index] if isinstance(group, Balancer) else None
    direction = route.direction
    if failpoint is not None and failpoint.due("readable"):
        direction = FailingDirection
    relay: Relay
    if group.targets[0].kind == SEQPACKET:
        buffer = worker.message_buffer
        assert buffer is not None  # made for the worker's sequential-packet listeners
        relay = MessageRelay(
            worker.poller,
            route.pool,
            buffer,
            client,
            target,
            worker.slot,
            BYTES_TO_TARGET,
            BYTES_TO_CLIENT,
            route.on_relay_closed,
            route.idle_sweep is not None,
            target_row,
        )
    else:
        relay = Relay(
            worker.poller,
            route.pool,
            client,
            target,
            worker.slot,
            BYTES_TO_TARGET,
            BYTES_TO_CLIENT,
            route.on_relay_closed,
            direction,
            target_row,
        )
    row = relay.target_row
    row[T_CONNECTIONS] += 1
    row[T_ACTIVE] += 1
    return relay
