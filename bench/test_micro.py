"""Micro-benchmarks of the splice relay: one connection's throughput, one connection's cost.

Run with `.venv/bin/pytest bench/test_micro.py --benchmark-only` (pytest's testpaths is
tests/, so the test suite leaves this file out). In-process, on TCP loopback (a socketpair
is AF_UNIX, whose splice(2) paths are not those of forkproxy's usual TCP case) and one real
uvloop loop. The relay and the far ends it joins, the client app and the target app, all
run on this one thread: a round's time is the CPU time of everything in it, with no
scheduler wake-up or GIL hand-off. Each benchmark has a `direct` twin, the same far ends
connected to each other without forkproxy; the difference is what the proxy costs,
including the second loopback TCP hop that any proxy adds.

Every round checks that each byte arrived (counts, content); nothing asserts speed.
Rounds are fixed (`benchmark.pedantic`): the whole file takes under 10 s.
"""

import asyncio
import os
import socket
from typing import Any

import pytest
import uvloop
from pytest_benchmark.fixture import BenchmarkFixture

from forkproxy.relay.poller import Poller
from forkproxy.relay.splice import PipePool, Relay
from forkproxy.relay.target_connect import set_socket_options
from forkproxy.relay.targets import TargetGroup
from forkproxy.settings.address import parse_target
from forkproxy.settings.config import DEFAULT_PIPE_SIZE
from forkproxy.settings.options import tcp_socket_options

KIB = 1024
MIB = 1024 * KIB
PIPE_POOL_KEEP = 4  # a connection holds at most two pipes; the rest wait for the next one
ROUND_TIMEOUT = 10.0  # seconds; a round this slow has lost bytes
NODELAY = tcp_socket_options(nodelay=True, keepalive=None)  # forkproxy's default options
TO_TARGET = 0  # counters fields the relay adds to
TO_CLIENT = 1
WINDOW_SHIFTS = 251  # distinct payload windows: a replayed byte cannot match by chance

THROUGHPUT_ROUNDS = 20
CONNECTION_ROUNDS = 40
CONNECTIONS_PER_ROUND = 50  # amortizes run_forever's ~40 µs start and stop
REQUEST_FILL = bytes(range(120))  # after the connection's 8-byte number
REQUEST_SIZE = 8 + len(REQUEST_FILL)

RELAY_OR_DIRECT = [pytest.param(True, id="relay"), pytest.param(False, id="direct")]
PROXY_OR_DIRECT = [pytest.param(True, id="proxy"), pytest.param(False, id="direct")]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets, non-blocking, with forkproxy's default options."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    for sock in (near, far):
        set_socket_options(sock, NODELAY)
        sock.setblocking(False)
    return near, far


def listening_socket() -> socket.socket:
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.setblocking(False)
    return listener


class LoopBench:
    """A uvloop loop that stops at the first failure, and a deadline for each round."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        # An exception in a callback would otherwise be logged and the round would hang.
        self.loop.set_exception_handler(self._on_loop_error)
        self.failure: str | None = None
        self.closing = False  # relays closed from here on are closed on purpose
        self._watchdog: asyncio.TimerHandle | None = None

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        self.loop.stop()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.fail(f"error in a loop callback: {context.get('exception') or context['message']}")

    def arm_watchdog(self) -> None:
        """Before a round, untimed."""
        self._watchdog = self.loop.call_later(
            ROUND_TIMEOUT, self.fail, f"round not done after {ROUND_TIMEOUT}s: bytes lost"
        )

    def disarm_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def run(self) -> None:
        self.loop.run_forever()
        if self.failure is not None:
            raise AssertionError(self.failure)


class OneWayStream(LoopBench):
    """Messages from the client app to the target app, through one relay or directly.

    One message is in flight at a time: the next is sent when the last byte of the one
    before has arrived. Small messages therefore cross the relay one readable event each
    (sent back to back, the kernel would merge them into large splices), and a round
    measures the cost per message as much as per byte.
    """

    def __init__(self, message_size: int, messages: int, via_relay: bool) -> None:
        super().__init__()
        self.message_size = message_size
        self.round_bytes = message_size * messages
        # Random, and a different window of it each round: bytes replayed from a reused
        # pipe or an earlier round do not pass the check.
        self.source = os.urandom(self.round_bytes + WINDOW_SHIFTS)
        self.payload = memoryview(self.source)[: self.round_bytes]
        self.received = bytearray(self.round_bytes)
        self.received_view = memoryview(self.received)
        self.rounds = 0
        self.sent = 0  # bytes of this round taken by the client app's socket
        self.delivered = 0  # bytes of this round read by the target app
        self.message_end = 0  # offset in the round where the message in flight ends
        self.sending = False  # a writer is registered on the client app
        self.counters = memoryview(bytearray(16 * 8)).cast("q")
        self.relay: Relay | None = None
        self.poller: Poller | None = None
        self.pool: PipePool | None = None
        if via_relay:
            self.client_app, client = tcp_pair()
            target, self.target_app = tcp_pair()
            self.poller = Poller(self.loop)
            self.pool = PipePool(DEFAULT_PIPE_SIZE, PIPE_POOL_KEEP)
            # The relay owns `client` and `target` and closes them.
            self.relay = Relay(
                self.poller,
                self.pool,
                client,
                target,
                self.counters,
                TO_TARGET,
                TO_CLIENT,
                self._on_relay_closed,
            )
            self.relay.start()
        else:
            self.client_app, self.target_app = tcp_pair()
        self.loop.add_reader(self.target_app.fileno(), self._on_target_app_readable)

    def setup(self) -> None:
        self.rounds += 1
        shift = self.rounds % WINDOW_SHIFTS
        self.payload = memoryview(self.source)[shift : shift + self.round_bytes]
        self.sent = self.delivered = self.message_end = 0
        self.counters[TO_TARGET] = self.counters[TO_CLIENT] = 0
        self.arm_watchdog()

    def run_round(self) -> None:
        self._send_message()
        self.run()

    def teardown(self) -> None:
        self.disarm_watchdog()
        assert self.delivered == self.round_bytes
        # Not `assert a == b`: pytest would diff megabytes on failure.
        same = self.received_view == self.payload
        assert same, f"round {self.rounds}: the target app received other bytes than sent"
        if self.relay is not None:
            assert self.counters[TO_TARGET] == self.round_bytes
            assert self.counters[TO_CLIENT] == 0

    def _send_message(self) -> None:
        self.message_end += self.message_size
        self._send()

    def _send(self) -> None:
        try:
            self.sent += self.client_app.send(self.payload[self.sent : self.message_end])
        except BlockingIOError:
            pass
        if self.sent < self.message_end:
            if not self.sending:
                self.sending = True
                self.loop.add_writer(self.client_app.fileno(), self._send)
        elif self.sending:
            self.sending = False
            self.loop.remove_writer(self.client_app.fileno())

    def _on_target_app_readable(self) -> None:
        try:
            count = self.target_app.recv_into(self.received_view[self.delivered : self.message_end])
        except BlockingIOError:
            return
        if count == 0:
            self.fail(f"the target app got EOF after {self.delivered} bytes of a round")
            return
        self.delivered += count
        if self.delivered < self.message_end:
            return
        if self.message_end < self.round_bytes:
            self._send_message()
        else:
            self.loop.stop()

    def _on_relay_closed(self, relay: Relay) -> None:
        if not self.closing:
            self.fail(f"the relay closed mid-stream: {relay.error}")

    def close(self) -> None:
        self.loop.remove_reader(self.target_app.fileno())
        if self.sending:
            self.loop.remove_writer(self.client_app.fileno())
        self.closing = True
        if self.relay is not None:
            self.relay.close()
        if self.poller is not None:
            self.poller.close()
        if self.pool is not None:
            self.pool.close()
        self.client_app.close()
        self.target_app.close()
        self.loop.close()


@pytest.mark.parametrize("via_relay", RELAY_OR_DIRECT)
@pytest.mark.parametrize(
    ("message_size", "messages"),
    [pytest.param(KIB, 1024, id="1KiB"), pytest.param(MIB, 16, id="1MiB")],
)
def test_relay_throughput(
    benchmark: BenchmarkFixture, message_size: int, messages: int, via_relay: bool
) -> None:
    """One round: `messages` messages of `message_size` bytes, client app to target app."""
    label = "1 KiB" if message_size == KIB else "1 MiB"
    benchmark.group = f"throughput, {label} messages, {message_size * messages // MIB} MiB a round"
    stream = OneWayStream(message_size, messages, via_relay)
    try:
        benchmark.pedantic(
            stream.run_round,
            setup=stream.setup,
            teardown=stream.teardown,
            rounds=THROUGHPUT_ROUNDS,
            warmup_rounds=2,
        )
    finally:
        stream.close()
    benchmark.extra_info["bytes_per_round"] = stream.round_bytes
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_MiB_per_s"] = stream.round_bytes / median / MIB
        benchmark.extra_info["median_us_per_message"] = median / messages * 1e6


class _PendingClient:
    """An accepted client while its target connection opens (as in relay/connecting.py)."""

    __slots__ = ("churn", "client")

    def __init__(self, churn: "ConnectionChurn", client: socket.socket) -> None:
        self.churn = churn
        self.client = client

    def on_connected(self, target: socket.socket) -> None:
        self.churn.on_target_connected(self.client, target)

    def on_failed(self, error: OSError) -> None:
        self.client.close()
        self.churn.fail(f"cannot connect to the target app: {error}")


class ConnectionChurn(LoopBench):
    """Whole connections, one after another, through forkproxy's parts or directly.

    The client app connects, sends a 128-byte request and reads to EOF; the target app
    echoes the request and closes, as an HTTP/1.0 server would. Through the proxy, each
    connection is accepted as worker.on_listener_readable does (minus admission and the
    scoreboard), connected to the target by `TargetGroup.connect`, relayed by a `Relay` and
    closed by it once both directions saw EOF. The next connection starts when the client
    app has its reply and the relay has closed.
    """

    def __init__(self, per_round: int, via_proxy: bool) -> None:
        super().__init__()
        self.per_round = per_round
        self.opened = 0  # connections started this round
        self.number = 0  # over all rounds: tags each request
        self.counters = memoryview(bytearray(16 * 8)).cast("q")
        self.client_app: socket.socket | None = None  # the connection under way
        self.request = b""
        self.reply = bytearray()
        self.client_done = False
        self.relay_done = False
        self.echoes: set[socket.socket] = set()  # target app's connections; it closes them
        self.relays: set[Relay] = set()
        self.target_listener = listening_socket()
        self.loop.add_reader(self.target_listener.fileno(), self._on_target_listener_readable)
        self.listener: socket.socket | None = None
        self.poller: Poller | None = None
        self.pool: PipePool | None = None
        target_address = self.target_listener.getsockname()
        self.connect_to = target_address
        if via_proxy:
            self.listener = listening_socket()
            self.connect_to = self.listener.getsockname()
            self.poller = Poller(self.loop)
            self.pool = PipePool(DEFAULT_PIPE_SIZE, PIPE_POOL_KEEP)
            target = parse_target(f"127.0.0.1:{target_address[1]}")
            self.group = TargetGroup([target], options=NODELAY)
            self.loop.add_reader(self.listener.fileno(), self._on_listener_readable)

    def setup(self) -> None:
        self.opened = 0
        self.counters[TO_TARGET] = self.counters[TO_CLIENT] = 0
        self.arm_watchdog()

    def run_round(self) -> None:
        self._open_connection()
        self.run()

    def teardown(self) -> None:
        self.disarm_watchdog()
        assert self.opened == self.per_round
        assert self.client_done and self.relay_done
        assert not self.echoes and not self.relays
        if self.poller is not None:
            expected = self.per_round * REQUEST_SIZE
            assert self.counters[TO_TARGET] == expected
            assert self.counters[TO_CLIENT] == expected
            assert self.poller.watching() == 0  # every socket forgotten

    # -- the client app ------------------------------------------------------------------

    def _open_connection(self) -> None:
        self.opened += 1
        self.number += 1
        self.request = self.number.to_bytes(8, "big") + REQUEST_FILL
        self.reply = bytearray()
        self.client_done = False
        self.relay_done = self.poller is None
        client_app = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.client_app = client_app
        set_socket_options(client_app, NODELAY)
        # Blocking, but on loopback the kernel completes the handshake into the listen
        # backlog without the accepting side running.
        client_app.connect(self.connect_to)
        client_app.setblocking(False)
        client_app.send(self.request)  # a new socket's buffer takes it whole
        self.loop.add_reader(client_app.fileno(), self._on_client_app_readable)

    def _on_client_app_readable(self) -> None:
        client_app = self.client_app
        assert client_app is not None
        try:
            data = client_app.recv(4096)
        except BlockingIOError:
            return
        if data:
            self.reply += data
            return
        self.loop.remove_reader(client_app.fileno())
        client_app.close()
        self.client_app = None
        if self.reply != self.request:
            self.fail(f"connection {self.number}: reply {bytes(self.reply)!r}")
            return
        self.client_done = True
        self._next_connection()

    def _next_connection(self) -> None:
        if not (self.client_done and self.relay_done):
            return
        if self.opened < self.per_round:
            self._open_connection()
        else:
            self.loop.stop()

    # -- the target app: echo one request, then close ---------------------------------

    def _on_target_listener_readable(self) -> None:
        while True:
            try:
                echo, _ = self.target_listener.accept()
            except BlockingIOError:
                return
            echo.setblocking(False)
            self.echoes.add(echo)
            self.loop.add_reader(echo.fileno(), self._on_echo_readable, echo, bytearray())

    def _on_echo_readable(self, echo: socket.socket, request: bytearray) -> None:
        try:
            data = echo.recv(REQUEST_SIZE - len(request))
        except BlockingIOError:
            return
        if not data:
            self.fail(f"the target app got EOF after {len(request)} bytes of a request")
            return
        request += data
        if len(request) < REQUEST_SIZE:
            return
        echo.send(request)  # a new socket's buffer takes it whole
        self.loop.remove_reader(echo.fileno())
        self.echoes.discard(echo)
        echo.close()

    # -- the proxy -----------------------------------------------------------------------

    def _on_listener_readable(self) -> None:
        assert self.listener is not None and self.poller is not None
        accept = self.listener._accept  # type: ignore[attr-defined]  # a fd, as the worker
        while True:
            try:
                fd, _peer = accept()
            except BlockingIOError:
                return
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
            client.setblocking(False)
            set_socket_options(client, NODELAY)
            pending = _PendingClient(self, client)
            self.group.connect(self.loop, self.poller, pending.on_connected, pending.on_failed)

    def on_target_connected(self, client: socket.socket, target: socket.socket) -> None:
        assert self.poller is not None and self.pool is not None
        try:
            relay = Relay(
                self.poller,
                self.pool,
                client,
                target,
                self.counters,
                TO_TARGET,
                TO_CLIENT,
                self._on_relay_closed,
            )
        except BaseException:
            client.close()  # nobody owns them yet
            target.close()
            raise
        self.relays.add(relay)  # from here on the relay owns both sockets
        relay.start()

    def _on_relay_closed(self, relay: Relay) -> None:
        self.relays.discard(relay)
        if self.closing:
            return
        if relay.error is not None:
            self.fail(f"connection {self.number}: the relay failed: {relay.error}")
            return
        self.relay_done = True
        self._next_connection()

    def close(self) -> None:
        self.closing = True
        for relay in list(self.relays):
            relay.close()
        for echo in self.echoes:
            self.loop.remove_reader(echo.fileno())
            echo.close()
        if self.client_app is not None:
            self.loop.remove_reader(self.client_app.fileno())
            self.client_app.close()
        for listener in (self.listener, self.target_listener):
            if listener is not None:
                self.loop.remove_reader(listener.fileno())
                listener.close()
        if self.poller is not None:
            self.poller.close()
        if self.pool is not None:
            self.pool.close()
        self.loop.close()


@pytest.mark.parametrize("via_proxy", PROXY_OR_DIRECT)
def test_connection_cost(benchmark: BenchmarkFixture, via_proxy: bool) -> None:
    """One round: CONNECTIONS_PER_ROUND whole connections, one after another."""
    benchmark.group = f"connection cost, {CONNECTIONS_PER_ROUND} connections a round"
    churn = ConnectionChurn(CONNECTIONS_PER_ROUND, via_proxy)
    try:
        benchmark.pedantic(
            churn.run_round,
            setup=churn.setup,
            teardown=churn.teardown,
            rounds=CONNECTION_ROUNDS,
            warmup_rounds=2,
        )
    finally:
        churn.close()
    benchmark.extra_info["connections_per_round"] = CONNECTIONS_PER_ROUND
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_us_per_connection"] = median / CONNECTIONS_PER_ROUND * 1e6
