"""The splice relay on real socketpairs and a real uvloop loop."""

import errno
import os
import socket
import struct
import threading
from collections.abc import Callable

import pytest
import uvloop

from forkproxy.relay.internal_error import INTERNAL_ERROR
from forkproxy.relay.pipes import Pipe
from forkproxy.relay.poller import Poller
from forkproxy.relay.splice import Direction, PipePool, Relay


class Harness:
    """client_app <-> [client | relay | target] <-> target_app, on socketpairs or TCP."""

    def __init__(self, tcp: bool = False) -> None:
        self.loop = uvloop.new_event_loop()
        pair = _tcp_pair if tcp else socket.socketpair
        self.client_app, client = pair()
        target, self.target_app = pair()
        client.setblocking(False)
        target.setblocking(False)
        self.counters = memoryview(bytearray(16 * 8)).cast("q")
        self.pool = PipePool(0, 4)
        self.closed: list[Relay] = []
        self.relay = Relay(
            Poller(self.loop), self.pool, client, target, self.counters, 0, 1, self.closed.append
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


@pytest.fixture
def tcp_harness():
    h = Harness(tcp=True)
    yield h
    h.close()


def _read_all(sock: socket.socket, into: bytearray) -> threading.Thread:
    def run() -> None:
        while chunk := sock.recv(1 << 16):
            into.extend(chunk)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _count_reads(direction: Direction) -> Callable[[], int]:
    """Route a started direction's readable events through a counter; returns its reader."""
    calls = 0
    original = direction.on_readable
    assert original is not None

    def counting() -> None:
        nonlocal calls
        calls += 1
        original()

    direction.on_readable = counting
    direction.io.remove_reader(direction.src_fd)
    direction.io.add_reader(direction.src_fd, counting)
    return lambda: calls


def test_both_directions_and_byte_counts(harness: Harness) -> None:
    harness.client_app.sendall(b"request")
    harness.target_app.sendall(b"response!")
    harness.run_until(lambda: harness.counters[0] == 7 and harness.counters[1] == 9)
    assert harness.target_app.recv(100) == b"request"
    assert harness.client_app.recv(100) == b"response!"


def test_half_close_then_reply(harness: Harness) -> None:
    harness.client_app.sendall(b"question")
    harness.client_app.shutdown(socket.SHUT_WR)
    harness.run_until(lambda: harness.relay.client_to_target.done)
    assert harness.target_app.recv(100) == b"question"
    assert harness.target_app.recv(100) == b""  # the EOF was passed on
    assert not harness.relay.closed  # the other direction is still open
    harness.target_app.sendall(b"answer")
    harness.target_app.shutdown(socket.SHUT_WR)
    harness.run_until(lambda: harness.relay.closed)
    assert harness.client_app.recv(100) == b"answer"
    assert harness.closed == [harness.relay]


def _sender(sock: socket.socket, payload: bytes) -> threading.Thread:
    def run() -> None:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the relay was closed on purpose

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_backpressure_pauses_reading_without_spinning(harness: Harness) -> None:
    direction = harness.relay.client_to_target
    calls = _count_reads(direction)

    payload = os.urandom(8 << 20)
    sender = _sender(harness.client_app, payload)
    # Nobody reads the target: the relay fills the socket buffers and its pipe, then stops.
    harness.run_until(lambda: not direction.reading)
    calls_when_paused = calls()
    harness.loop.call_later(0.3, harness.loop.stop)
    harness.loop.run_forever()
    assert calls() == calls_when_paused  # no wakeups while the destination is full
    received = bytearray()
    reader = _read_all(harness.target_app, received)
    harness.run_until(lambda: harness.counters[0] == len(payload), timeout=30)
    sender.join()
    harness.client_app.shutdown(socket.SHUT_WR)
    harness.run_until(lambda: direction.done)
    reader.join()
    assert bytes(received) == payload


def test_reset_closes_both_sides_once(harness: Harness) -> None:
    harness.target_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    harness.client_app.sendall(b"x" * 1000)
    harness.run_until(lambda: harness.counters[0] == 1000)
    harness.target_app.close()  # with unread data and linger 0: a reset
    harness.run_until(lambda: harness.relay.closed)
    assert harness.closed == [harness.relay]
    assert harness.client_app.recv(10) == b""


def test_pipes_return_to_the_pool_empty(harness: Harness) -> None:
    received = bytearray()
    reader = _read_all(harness.target_app, received)
    sender = _sender(harness.client_app, b"a" * 1_000_000)
    harness.run_until(lambda: harness.counters[0] == 1_000_000)
    sender.join()
    harness.client_app.shutdown(socket.SHUT_WR)
    harness.target_app.shutdown(socket.SHUT_WR)
    harness.run_until(lambda: harness.relay.closed)
    reader.join()
    assert len(received) == 1_000_000
    assert harness.relay.client_to_target.pipe is None
    assert 1 <= len(harness.pool._free) <= 2
    for pipe in harness.pool._free:
        with pytest.raises(BlockingIOError):
            os.read(pipe.read_fd, 1)  # empty


def test_a_pipe_with_bytes_in_flight_is_not_reused(harness: Harness) -> None:
    direction = harness.relay.client_to_target
    sender = _sender(harness.client_app, os.urandom(8 << 20))
    harness.run_until(lambda: not direction.reading)  # the target is full, pipe holds bytes
    pipe = direction.pipe
    assert pipe is not None and direction.pending > 0
    harness.relay.close()
    sender.join()  # the relay's close ends its sendall
    assert pipe not in harness.pool._free
    with pytest.raises(OSError):
        os.fstat(pipe.read_fd)


def test_data_and_the_eof_behind_it_take_one_wakeup(harness: Harness) -> None:
    """A peer that wrote and shut down: its data and its EOF are read in one go, not on
    two wakeups (the poller reports EPOLLRDHUP with the data)."""
    direction = harness.relay.client_to_target
    calls = _count_reads(direction)
    harness.client_app.sendall(b"last words")
    harness.client_app.shutdown(socket.SHUT_WR)
    harness.run_until(lambda: direction.done)
    assert calls() == 1
    assert harness.target_app.recv(100) == b"last words"
    assert harness.target_app.recv(100) == b""  # the EOF was passed on


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


def test_urgent_data_is_relayed_inline_without_spinning() -> None:
    """TCP urgent data stops splice(2) at its mark while the socket stays readable: the
    relay must get past it (the urgent byte in its place) instead of spinning."""
    loop = uvloop.new_event_loop()
    client_app, client = _tcp_pair()
    target, target_app = _tcp_pair()
    for sock in (client, target):
        sock.setblocking(False)
    counters = memoryview(bytearray(16 * 8)).cast("q")
    closed: list[Relay] = []
    poller = Poller(loop)
    pool = PipePool(0, 4)
    relay = Relay(poller, pool, client, target, counters, 0, 1, closed.append)
    relay.start()
    calls = _count_reads(relay.client_to_target)
    try:
        client_app.sendall(b"hello")
        client_app.send(b"!", socket.MSG_OOB)
        client_app.sendall(b"world")
        deadline = loop.time() + 10

        def check() -> None:
            if counters[0] >= 11 or loop.time() > deadline or calls() > 1000:
                loop.stop()
            else:
                loop.call_later(0.005, check)

        loop.call_soon(check)
        loop.run_forever()
        assert calls() <= 1000, "the relay spun on the urgent mark"
        target_app.settimeout(5)
        received = b""
        while len(received) < 11:
            received += target_app.recv(100)
        assert received == b"hello!world"
    finally:
        relay.close()
        poller.close()
        pool.close()
        loop.close()
        client_app.close()
        target_app.close()


# -- how a connection ends: a clean end, an abort ------------------------------------------

LINGER_RESET = struct.pack("ii", 1, 0)


def _ends_with(sock: socket.socket) -> tuple[bytes, str]:
    """What `sock` reads until the connection ends, and how: "eof" or "reset"."""
    sock.settimeout(5)
    received = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            received += chunk
    except ConnectionResetError:
        return bytes(received), "reset"
    return bytes(received), "eof"


def test_a_target_reset_is_passed_on_to_the_client_as_a_reset(tcp_harness: Harness) -> None:
    harness = tcp_harness
    harness.target_app.sendall(b"partial response")
    harness.run_until(lambda: harness.counters[1] == 16)
    harness.target_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    harness.target_app.close()
    harness.run_until(lambda: harness.relay.closed)
    assert harness.relay.error is not None and harness.relay.error.errno == errno.ECONNRESET
    assert _ends_with(harness.client_app) == (b"partial response", "reset")


def test_a_client_reset_is_passed_on_to_the_target_as_a_reset(tcp_harness: Harness) -> None:
    harness = tcp_harness
    harness.client_app.sendall(b"partial upload")
    harness.run_until(lambda: harness.counters[0] == 14)
    harness.client_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    harness.client_app.close()
    harness.run_until(lambda: harness.relay.closed)
    assert _ends_with(harness.target_app) == (b"partial upload", "reset")


def test_a_half_closed_connection_that_resets_is_still_an_abort(tcp_harness: Harness) -> None:
    """The client's EOF went on as a FIN; then the target resets: the client gets an RST
    after all (its request went through, the response did not)."""
    harness = tcp_harness
    harness.client_app.sendall(b"request")
    harness.client_app.shutdown(socket.SHUT_WR)
    harness.run_until(lambda: harness.relay.client_to_target.done)
    assert _ends_with(harness.target_app) == (b"request", "eof")
    harness.target_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    harness.target_app.close()
    harness.run_until(lambda: harness.relay.closed)
    assert _ends_with(harness.client_app) == (b"", "reset")


def test_clean_ends_are_fins_after_every_byte(tcp_harness: Harness) -> None:
    harness = tcp_harness
    harness.client_app.sendall(b"request")
    harness.client_app.shutdown(socket.SHUT_WR)
    harness.target_app.sendall(b"response")
    harness.target_app.shutdown(socket.SHUT_WR)
    harness.run_until(lambda: harness.relay.closed)
    assert harness.relay.error is None
    assert _ends_with(harness.target_app) == (b"request", "eof")
    assert _ends_with(harness.client_app) == (b"response", "eof")


def test_fail_resets_both_peers(tcp_harness: Harness) -> None:
    """What the idle and graceful timeouts do: both peers read ECONNRESET."""
    harness = tcp_harness
    harness.relay.fail(OSError(errno.ETIMEDOUT, "timed out"))
    assert harness.closed == [harness.relay]
    assert _ends_with(harness.client_app) == (b"", "reset")
    assert _ends_with(harness.target_app) == (b"", "reset")


class _FlakyPool(PipePool):
    """Its `release` raises once, as a bug in a teardown step would."""

    def __init__(self) -> None:
        super().__init__(0, 4)
        self.broken = True

    def release(self, pipe: Pipe) -> None:
        if self.broken:
            self.broken = False
            raise RuntimeError("release bug")
        super().release(pipe)


def test_salvage_finishes_a_teardown_cut_short() -> None:
    loop = uvloop.new_event_loop()
    client_app, client = _tcp_pair()
    target, target_app = _tcp_pair()
    for sock in (client, target):
        sock.setblocking(False)
    pool = _FlakyPool()
    closed: list[Relay] = []
    counters = memoryview(bytearray(16 * 8)).cast("q")
    relay = Relay(Poller(loop), pool, client, target, counters, 0, 1, closed.append)
    relay.start()
    lent = relay.client_to_target.pipe = pool.acquire()  # an empty pipe, lent out
    try:
        with pytest.raises(RuntimeError, match="release bug"):
            relay.close()  # raises at the pipe's return, before the sockets are closed
        assert relay.closed and closed == [] and client.fileno() >= 0
        relay.salvage(INTERNAL_ERROR)
        relay.salvage(INTERNAL_ERROR)  # again: nothing is done twice
        assert closed == [relay] and relay.error is INTERNAL_ERROR
        assert client.fileno() == -1 and target.fileno() == -1
        assert _ends_with(client_app) == (b"", "reset")
        assert _ends_with(target_app) == (b"", "reset")
    finally:
        lent.close()  # its return failed: nobody else closes it
        pool.close()
        loop.close()
        client_app.close()
        target_app.close()
