"""One connection systemd already accepted: relay it to the target, then exit.

Two ways to get here: Accept=yes, where the only socket passed (LISTEN_FDS=1) is a
connected stream socket rather than a listener; and --inetd (StandardInput=socket), where
the connection is standard input. No workers, no scoreboard: one uvloop loop in this
process runs the same target connect and splice relay as a worker does, with the same
relay options (several targets, timeouts, socket options, PROXY header, pipe size), the
global ones: --route, listener sections and --metrics do not apply, there being neither
listener nor master. Exit status 0 when the connection ends, aborted by a peer or not
(aborts are passed on as in a worker, see relay/splice.py), 1 if no target can be
reached or an internal error cut the connection short (it is aborted, one warning is
logged).
"""

import logging
import math
import signal
import socket
import time
from typing import Any, Protocol

import uvloop

from forkproxy.errors import ForkproxyError
from forkproxy.relay.failpoints import FailingDirection, failpoint_from_environment
from forkproxy.relay.internal_error import INTERNAL_ERROR, InternalErrors
from forkproxy.relay.poller import Poller
from forkproxy.relay.proxy_protocol import header_encoder
from forkproxy.relay.splice import Direction, IdleDirection, PipePool, Relay, reset_on_close
from forkproxy.relay.target_connect import (
    TCP_FAMILIES,
    TargetConnect,
    send_proxy_header,
    set_socket_options,
)
from forkproxy.relay.targets import FailoverConnect, TargetGroup
from forkproxy.relay.timeouts import (
    GRACEFUL_ERROR,
    LazySweep,
    sweep_connects,
    sweep_idle,
    sweep_interval,
)
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
    loop.set_exception_handler(connection.on_loop_error)
    loop.add_signal_handler(signal.SIGTERM, connection.on_sigterm)
    loop.add_signal_handler(signal.SIGINT, connection.on_sigterm)
    try:
        try:
            connection.start()  # on loopback the relay may start (or the connect fail) here
        except Exception as error:
            connection.crashed(error)
        loop.run_forever()  # returns at once if the above stopped it
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
        self.poller = Poller(loop, self.on_callback_error)
        self.internal_errors = InternalErrors(log)
        self.failpoint = failpoint_from_environment()  # tests only: see relay/failpoints.py
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
        # The targets in order, then the backups: one connection has no balancing to do.
        targets = self.config.targets + self.config.backup
        group = TargetGroup(targets, self.config.connect_timeout, self.options)
        attempt = group.connect(self.loop, self.poller, self.on_connected, self.on_failed)
        still_connecting = self.relay is None and self.status == 0
        if still_connecting and self.config.connect_timeout != math.inf:
            self.connecting.append(attempt)
            interval = sweep_interval(self.config.connect_timeout)
            LazySweep(self.loop, interval, self.connecting, self._sweep_connect).arm()

    def _sweep_connect(self, now: float) -> None:
        sweep_connects(self.connecting, now, self._on_sweep_error)

    def _sweep_idle(self, now: float) -> None:
        sweep_idle(self.relays, now, self.config.idle_timeout, self._on_sweep_error)

    def _on_sweep_error(self, _item: object, error: Exception) -> None:
        self.crashed(error)

    def on_connected(self, target: socket.socket, index: int = -1) -> None:
        """Relay client and target (`index`: which of the targets, unused). Never raises:
        an internal error ends the connection."""
        self.connecting.clear()
        try:
            self._relay(target)
        except Exception as error:
            if self.relay is None:
                target.close()
            self.crashed(error)

    def _relay(self, target: socket.socket) -> None:
        config = self.config
        if config.proxy_protocol:
            family = self.client.family
            try:
                local = self.client.getsockname() if family in TCP_FAMILIES else None
                encode = header_encoder(1 if config.proxy_protocol == 1 else 2)
                send_proxy_header(target, encode(self.client.getpeername(), local, family))
            except Exception as error:  # ValueError from the encoder too: a failed connect
                target.close()
                self.on_failed(error if isinstance(error, OSError) else OSError(str(error)))
                return
        idle = config.idle_timeout != math.inf
        direction: type[Direction] = IdleDirection if idle else Direction
        failpoint = self.failpoint
        if failpoint is not None and failpoint.due("readable"):
            direction = FailingDirection
        self.relay = Relay(
            self.poller,
            self.pool,
            self.client,
            target,
            self.counters,
            BYTES_TO_TARGET,
            BYTES_TO_CLIENT,
            self.on_closed,
            direction,
        )
        if idle:
            self.relay.quiet_since = time.monotonic()
            self.relays.add(self.relay)
            interval = sweep_interval(config.idle_timeout)
            LazySweep(self.loop, interval, self.relays, self._sweep_idle).arm()
        if failpoint is not None and failpoint.due("connected"):
            raise failpoint.fault()
        self.relay.start()
        self.notifier.ready(f"relaying {self.peer} to {target.getpeername()}")

    def on_failed(self, error: OSError) -> None:
        self.connecting.clear()
        log.error(
            "cannot connect to target %s for %s: %s",
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
            "connection from %s done: %d bytes to target, %d to client",
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
            self.relay.fail(GRACEFUL_ERROR)  # an abort: the stream is cut short
        else:
            self.client.close()
        self.loop.stop()

    # -- internal errors -----------------------------------------------------------------

    def on_callback_error(self, _fd: int, error: Exception) -> None:
        """The poller's `on_error`: every socket it watches is this connection's."""
        self.crashed(error)

    def on_loop_error(self, _loop: object, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if not isinstance(error, Exception):
            error = RuntimeError(context.get("message", "unknown error"))
        self.crashed(error)

    def crashed(self, error: Exception) -> None:
        """An exception escaped from the connection's code: one warning, abort the
        connection (an RST to its peers), exit 1."""
        self.internal_errors.report(f"on the connection from {self.peer}", error)
        self.status = 1
        try:
            for attempt in self.connecting:
                attempt.cancel()
            self.connecting.clear()
            if self.relay is not None:
                self.relay.salvage(INTERNAL_ERROR)
            else:
                reset_on_close(self.client)
                self.client.close()
        finally:
            self.loop.stop()
