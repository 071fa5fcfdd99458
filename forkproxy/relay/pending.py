"""One admitted client on its way to a relay: what it holds while its connect is under way.

A `PendingClient` is a record of the `Connector` (connecting.py), which owns it: the
client's socket, its admission token, its listener's route and row of counters, its
access-log trail and the addresses a PROXY header carried, and the connect attempt
under way. It passes the attempt's outcome back to its connector and does nothing else.
"""

import socket
import time
from typing import TYPE_CHECKING

from forkproxy.relay.accept_proxy import Carried
from forkproxy.relay.access_log import Trail
from forkproxy.relay.balance import BalancedConnect
from forkproxy.relay.plans import Route
from forkproxy.relay.target_connect import TargetConnect
from forkproxy.relay.targets import FailoverConnect

if TYPE_CHECKING:
    from forkproxy.relay.connecting import Connector


class PendingClient:
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
        "trail",
        "carried",
    )

    def __init__(
        self,
        connector: "Connector",
        client: socket.socket,
        token: int,
        peer: object,
        route: Route,
        counters: memoryview,
        trail: Trail | None,
        carried: Carried | None,
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
        self.trail = trail  # --access-log: its line in the making
        self.carried = carried  # --accept-proxy: the addresses its PROXY header carried

    def on_connected(self, target: socket.socket, index: int = -1) -> None:
        """Connected to target `index` of its route's balancer (-1: a `TargetGroup`'s)."""
        self.connector.on_target_connected(self, target, index)

    def on_failed(self, error: OSError) -> None:
        self.connector.on_connect_failed(self, error)
