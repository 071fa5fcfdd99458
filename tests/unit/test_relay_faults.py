"""The relay when the worker runs out of descriptors: a connection waits, it is not failed."""

import errno
import os
import socket
import time

import uvloop

from forkproxy.relay import PIPE_RETRY_INTERVAL, Pipe, PipePool, Relay


class ExhaustedPool(PipePool):
    """A pipe pool whose pipe2() fails with EMFILE, as in a worker with a full fd table."""

    def __init__(self) -> None:
        super().__init__(0, 4)
        self.exhausted = True
        self.refused = 0

    def acquire(self) -> Pipe:
        if self.exhausted:
            self.refused += 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return super().acquire()


def _run_until(loop: uvloop.Loop, condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout

    def check() -> None:
        if condition() or time.monotonic() > deadline:
            loop.stop()
        else:
            loop.call_later(0.005, check)

    loop.call_soon(check)
    loop.run_forever()
    assert condition(), "timed out"


def test_no_pipe_for_a_direction_waits_and_delivers_once_fds_are_free() -> None:
    loop = uvloop.new_event_loop()
    client_app, client = socket.socketpair()
    upstream, upstream_app = socket.socketpair()
    for sock in (client, upstream):
        sock.setblocking(False)
    counters = memoryview(bytearray(16 * 8)).cast("q")
    pool = ExhaustedPool()
    closed: list[Relay] = []
    relay = Relay(loop, pool, client, upstream, counters, 0, 1, closed.append)
    try:
        relay.start()
        client_app.sendall(b"request")
        cpu_before, wall_before = time.thread_time(), time.monotonic()
        # Two refusals: the direction came back after its pause and tried again.
        _run_until(loop, lambda: pool.refused >= 2 or bool(closed))
        cpu, wall = time.thread_time() - cpu_before, time.monotonic() - wall_before
        assert closed == [], f"the connection was failed: {relay.error}"
        assert wall >= PIPE_RETRY_INTERVAL * 0.9  # waited for the pause, not a retry loop
        assert cpu < wall / 4, f"{cpu:.3f}s CPU in {wall:.3f}s: spinning on a readable socket"
        pool.exhausted = False
        _run_until(loop, lambda: counters[0] == 7)
        assert upstream_app.recv(100) == b"request"
        # And it still works both ways, as an ordinary connection.
        upstream_app.sendall(b"reply")
        _run_until(loop, lambda: counters[1] == 5)
        assert client_app.recv(100) == b"reply"
        assert closed == []
    finally:
        relay.close()
        pool.close()
        loop.close()
        client_app.close()
        upstream_app.close()


def test_a_closed_relay_never_retries_on_a_reused_fd() -> None:
    """The pause timer must die with the relay: its fd numbers may belong to others by then."""
    loop = uvloop.new_event_loop()
    client_app, client = socket.socketpair()
    upstream, upstream_app = socket.socketpair()
    for sock in (client, upstream):
        sock.setblocking(False)
    counters = memoryview(bytearray(16 * 8)).cast("q")
    pool = ExhaustedPool()
    closed: list[Relay] = []
    relay = Relay(loop, pool, client, upstream, counters, 0, 1, closed.append)
    try:
        relay.start()
        client_app.sendall(b"request")
        _run_until(loop, lambda: pool.refused >= 1)
        relay.close()
        refused = pool.refused
        stop_at = time.monotonic() + 3 * PIPE_RETRY_INTERVAL
        _run_until(loop, lambda: time.monotonic() > stop_at)
        assert pool.refused == refused
        assert counters[0] == 0
    finally:
        relay.close()
        pool.close()
        loop.close()
        client_app.close()
        upstream_app.close()
