"""One connection systemd already accepted: relay it to the target, then exit.

Two ways to get here: Accept=yes, where the only socket passed (LISTEN_FDS=1) is a
connected stream socket rather than a listener; and --inetd (StandardInput=socket), where
the connection is standard input. No workers, no scoreboard: one uvloop loop in this
process runs the same target connect and splice relay as a worker does, with the same
relay options (several targets, timeouts, socket options, PROXY header, pipe size), the
global ones: --route, listener sections and --metrics do not apply, there being neither
listener nor master. Exit status 0 when the connection ends, 1 if no target can be
reached.
"""

import logging
import math
import signal
import socket
import time
from typing import Protocol

import uvloop

from forkproxy.errors import ForkproxyError
from forkproxy.relay.poller import Poller
from forkproxy.relay.proxy_protocol import header_encoder
from forkproxy.relay.splice import Direction, IdleDirection, PipePool, Relay
from forkproxy.relay.target_connect import (
    TCP_FAMILIES,
    TargetConnect,
    send_proxy_header,
    set_socket_options,
)
from forkproxy.relay.targets import FailoverConnect, TargetGroup
from forkproxy.relay.timeouts import LazySweep, sweep_connects, sweep_idle, sweep_interval
from forkproxy.settings.address import format_sockaddr
from forkproxy.settings.config import Config
from forkproxy.settings.options import tcp_socket_options
from forkproxy.shared.listener import is_connection
from forkproxy.shared.scoreboard import BYTES_TO_CLIENT, BYTES_TO_TARGET, SLOT_WORDS

log = logging.getLogger("forkproxy")


class Notifier(Protocol):
    """The sd_notify(3) messages a one-shot relay sends; the caller owns the socket
    (`supervisor.notify.Notifier`, a no-op without $NOTIFY_SOCKET)."""

    def ready(self, status: str) -> None: ...

    def stopping(self, status: str) -> None: ...


def relay_connection(config: Config, fd: int, what: str, notifier: Notifier) -> int:
    """Relay the connected socket on `fd` to the target; return the exit status."""
    if not is_connection(fd):
        raise ForkproxyError(f"{what} is not a connected stream socket")
    # --inetd refuses them on the command line; Accept=yes is known only now.
    for option, value in (
        ("--metrics", config.metrics),
        ("--route/listener sections", config.listeners),
    ):
        if value:
            log.warning("%s does not apply to one connection (Accept=yes), ignoring it", option)
    if not config.targets:
        raise ForkproxyError(
            f"no target for {what}: per-listener targets do not apply to one connection "
            "(Accept=yes); give targets as arguments or at the top of the configuration file"
        )
    client = socket.socket(fileno=fd)
    client.setblocking(False)
    try:
        peer = format_sockaddr(client.family, client.getpeername())
    except OSError:
        peer = "?"
    loop = uvloop.new_event_loop()
    connection = _Connection(config, loop, client, peer, notifier)
    loop.add_signal_handler(signal.SIGTERM, connection.on_sigterm)
    loop.add_signal_handler(signal.SIGINT, connection.on_sigterm)
    try:
        connection.start()  # on loopback the relay may start (or the connect fail) in here
        loop.run_forever()
    finally:
        connection.poller.close()
        connection.pool.close()
        loop.close()
    return connection.status


class _Connection:
    def __init__(
        self,
        config: Config,
        loop: uvloop.Loop,
        client: socket.socket,
        peer: str,
        notifier: Notifier,
    ) -> None:
        self.config = config
        self.loop = loop
        self.client = client
        self.peer = peer
        self.notifier = notifier
        self.options = tcp_socket_options(config.nodelay, config.keepalive)
        self.pool = PipePool(config.pipe_size, 2)
        self.poller = Poller(loop)
        self.counters = memoryview(bytearray(SLOT_WORDS * 8)).cast("q")  # not shared
        self.connecting: list[TargetConnect | FailoverConnect] = []  # for the connect timeout
        self.relay: Relay | None = None
        self.relays: set[Relay] = set()  # what the idle sweep watches: this one relay
        self.status = 0
        self.stopping = False

    def start(self) -> None:
        if self.client.family in TCP_FAMILIES:
            try:
                set_socket_options(self.client, self.options)
            except OSError:
                pass  # the client is gone already: its relay will find out
        group = TargetGroup(self.config.targets, self.config.connect_timeout, self.options)
        attempt = group.connect(self.loop, self.poller, self.on_connected, self.on_failed)
        still_connecting = self.relay is None and self.status == 0
        if still_connecting and self.config.connect_timeout != math.inf:
            self.connecting.append(attempt)
            interval = sweep_interval(self.config.connect_timeout)
            LazySweep(self.loop, interval, self.connecting, self._sweep_connect).arm()

    def _sweep_connect(self, now: float) -> None:
        sweep_connects(self.connecting, now)

    def _sweep_idle(self, now: float) -> None:
        sweep_idle(self.relays, now, self.config.idle_timeout)

    def on_connected(self, target: socket.socket) -> None:
        self.connecting.clear()
        config = self.config
        if config.proxy_protocol:
            family = self.client.family
            try:
                local = self.client.getsockname() if family in TCP_FAMILIES else None
                encode = header_encoder(1 if config.proxy_protocol == 1 else 2)
                send_proxy_header(target, encode(self.client.getpeername(), local, family))
            except OSError as error:
                target.close()
                self.on_failed(error)
                return
        idle = config.idle_timeout != math.inf
        self.relay = Relay(
            self.poller,
            self.pool,
            self.client,
            target,
            self.counters,
            BYTES_TO_TARGET,
            BYTES_TO_CLIENT,
            self.on_closed,
            IdleDirection if idle else Direction,
        )
        if idle:
            self.relay.quiet_since = time.monotonic()
            self.relays.add(self.relay)
            interval = sweep_interval(config.idle_timeout)
            LazySweep(self.loop, interval, self.relays, self._sweep_idle).arm()
        self.relay.start()
        self.notifier.ready(f"relaying {self.peer} to {target.getpeername()}")

    def on_failed(self, error: OSError) -> None:
        self.connecting.clear()
        log.error(
            "cannot connect to upstream %s for %s: %s",
            " or ".join(f"'{target.text}'" for target in self.config.targets),
            self.peer,
            error.strerror or error,
        )
        self.client.close()
        self.status = 1
        self.loop.stop()

    def on_closed(self, relay: Relay) -> None:
        self.relays.discard(relay)
        log.debug(
            "connection from %s done: %d bytes to upstream, %d to client",
            self.peer,
            self.counters[BYTES_TO_TARGET],
            self.counters[BYTES_TO_CLIENT],
        )
        self.notifier.stopping("connection closed")
        self.loop.stop()

    def on_sigterm(self) -> None:
        """First stop: let the connection finish (bounded); a second: close it now."""
        if self.stopping or self.relay is None:
            self._close_now()
            return
        self.stopping = True
        self.notifier.stopping("asked to stop")
        if self.config.graceful_timeout != float("inf"):
            self.loop.call_later(self.config.graceful_timeout, self._close_now)

    def _close_now(self) -> None:
        if self.relay is not None:
            self.relay.close()
        else:
            self.client.close()
        self.loop.stop()
