"""The sequential-packet relay on real SOCK_SEQPACKET socketpairs and a uvloop loop."""

import random
import socket
import threading

import pytest
import uvloop

from forkproxy.relay.messages import MessageBuffer, unix_message_max
from forkproxy.relay.poller import Poller
from forkproxy.relay.seqpacket import MessageRelay
from forkproxy.relay.splice import PipePool, Relay
from tests.support.message_backend import check_framed, framed


class Harness:
    """client_app <-> [client | relay | target] <-> target_app, all SOCK_SEQPACKET, with
    the kernel's default buffers (the apps may send messages of up to 1 MiB)."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.client_app, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        target, self.target_app = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for app in (self.client_app, self.target_app):
            app.settimeout(10)
        client.setblocking(False)
        target.setblocking(False)
        self.counters = memoryview(bytearray(16 * 8)).cast("q")
        self.pool = PipePool(0, 4)
        self.closed: list[Relay] = []
        self.relay = MessageRelay(
            Poller(self.loop),
            self.pool,
            MessageBuffer(unix_message_max()),
            client,
            target,
            self.counters,
            0,
            1,
            self.closed.append,
        )
        self.relay.start()

    def run_until(self, condition, timeout: float = 10.0) -> None:
        deadline = self.loop.time() + timeout

        def check() -> None:
            if condition() or self.loop.time() > deadline:
                self.loop.stop()
            else:
                self.loop.call_later(0.005, check)

        self.loop.call_soon(check)
        self.loop.run_forever()
        assert condition(), "timed out"

    def close(self) -> None:
        self.relay.close()
        self.pool.close()
        self.loop.close()
        self.client_app.close()
        self.target_app.close()


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def _send_all(sock: socket.socket, messages: list[bytes]) -> threading.Thread:
    """Send `messages`, then the end, from a thread (the relay runs meanwhile)."""

    def run() -> None:
        if max(map(len, messages), default=0) > 200_000:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # room for 1 MiB
        for message in messages:
            sock.send(message)
        sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _receive_all(sock: socket.socket, into: list[bytes]) -> threading.Thread:
    """Read messages to the end in a thread (a zero-length read after the peer's end)."""

    def run() -> None:
        while message := sock.recv(1 << 23):
            into.append(message)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_messages_keep_their_boundaries_both_ways(harness: Harness) -> None:
    rng = random.Random(7)
    sizes = [40, 41, 4096, 65536, 212_000, 1_000_000] + [
        rng.randint(40, 100_000) for _ in range(50)
    ]
    at_target: list[bytes] = []
    reader = _receive_all(harness.target_app, at_target)
    sender = _send_all(harness.client_app, [framed(i, size) for i, size in enumerate(sizes)])
    harness.run_until(lambda: not reader.is_alive())
    sender.join()
    reader.join()
    assert [check_framed(message) for message in at_target] == list(range(len(sizes)))
    assert harness.counters[0] == sum(sizes)

    at_client: list[bytes] = []
    reader = _receive_all(harness.client_app, at_client)
    sizes.reverse()
    sender = _send_all(harness.target_app, [framed(i, n, seed=1) for i, n in enumerate(sizes)])
    harness.run_until(lambda: bool(harness.closed))
    sender.join()
    reader.join()
    assert [len(message) for message in at_client] == sizes
    assert [check_framed(message) for message in at_client] == list(range(len(sizes)))


def test_empty_messages_pass_and_the_end_is_passed_on(harness: Harness) -> None:
    harness.client_app.send(b"")
    harness.client_app.send(b"a")
    harness.client_app.send(b"")
    harness.client_app.send(b"bc")
    harness.run_until(lambda: harness.counters[0] == 3)
    assert [harness.target_app.recv(10) for _ in range(4)] == [b"", b"a", b"", b"bc"]
    harness.client_app.shutdown(socket.SHUT_WR)
    harness.run_until(lambda: harness.relay.client_to_target.done)
    assert harness.target_app.recv(10) == b""  # the end, passed on as SHUT_WR
    harness.target_app.send(b"still open the other way")  # half-close: this direction goes on
    harness.run_until(lambda: harness.counters[1] == 24)
    assert harness.client_app.recv(100) == b"still open the other way"
    assert not harness.closed


def test_backpressure_holds_a_message_and_loses_none(harness: Harness) -> None:
    """The target reads nothing while the client sends: the relay holds one message and
    stops reading, the client's sends then block (its peer's queue is full), and every
    message arrives once the target reads."""
    count = 300
    sender = _send_all(harness.client_app, [framed(i, 20_000 + i) for i in range(count)])
    direction = harness.relay.client_to_target
    harness.run_until(lambda: direction.held is not None and not direction.reading)
    assert sender.is_alive()  # blocked: nothing was dropped to let the client go on
    received: list[bytes] = []
    reader = _receive_all(harness.target_app, received)
    harness.run_until(lambda: direction.done)
    sender.join()
    reader.join()
    assert [check_framed(message) for message in received] == list(range(count))


def test_a_peer_gone_closes_both(harness: Harness) -> None:
    harness.target_app.close()
    harness.client_app.send(b"x" * 100)
    harness.run_until(lambda: bool(harness.closed))
    assert harness.client_app.recv(10) == b""
