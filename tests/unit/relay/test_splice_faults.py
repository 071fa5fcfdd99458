"""The relay when a pipe cannot be had (EMFILE): that connection ends, its neighbours don't.

Failing the one connection is the choice: it frees its two descriptors for the
others, where waiting for a pipe could leave every connection of a full worker waiting on
the others for ever. The worker keeps headroom so that this stays rare.
"""

import errno
import os
import socket
import time
from collections.abc import Callable

import uvloop

from forkproxy.relay.poller import Poller
from forkproxy.relay.splice import Pipe, PipePool, Relay


class ExhaustiblePool(PipePool):
    """A pipe pool whose pipe2() fails with EMFILE while `exhausted`, as in a full fd table."""

    def __init__(self) -> None:
        super().__init__(0, 4)
        self.exhausted = False
        self.lent = 0

    def acquire(self) -> Pipe:
        if self.exhausted:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        self.lent += 1
        return super().acquire()

    def release(self, pipe: Pipe) -> None:
        self.lent -= 1
        super().release(pipe)


class Pair:
    """client_app <-> [client | relay | target] <-> target_app on a shared loop and pool."""

    def __init__(self, loop: uvloop.Loop, pool: PipePool, closed: list[Relay]) -> None:
        self.client_app, client = socket.socketpair()
        target, self.target_app = socket.socketpair()
        client.setblocking(False)
        target.setblocking(False)
        self.counters = memoryview(bytearray(16 * 8)).cast("q")
        self.relay = Relay(Poller(loop), pool, client, target, self.counters, 0, 1, closed.append)
        self.relay.start()

    def close(self) -> None:
        self.relay.close()
        self.client_app.close()
        self.target_app.close()


def _run_until(loop: uvloop.Loop, condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout

    def check() -> None:
        if condition() or time.monotonic() > deadline:
            loop.stop()
        else:
            loop.call_later(0.005, check)

    loop.call_soon(check)
    loop.run_forever()
    assert condition(), "timed out"


def test_no_pipe_ends_that_connection_only() -> None:
    loop = uvloop.new_event_loop()
    pool = ExhaustiblePool()
    closed: list[Relay] = []
    healthy = Pair(loop, pool, closed)
    victim = Pair(loop, pool, closed)
    try:
        healthy.client_app.sendall(b"before")
        _run_until(loop, lambda: healthy.counters[0] == 6)
        assert healthy.target_app.recv(100) == b"before"

        pool.exhausted = True
        victim.client_app.sendall(b"no pipe for this")
        _run_until(loop, lambda: bool(closed))
        assert closed == [victim.relay]
        assert victim.relay.error is not None and victim.relay.error.errno == errno.EMFILE
        # Both of its ends are closed: its peers see the end, nothing hangs.
        victim.client_app.settimeout(5)
        victim.target_app.settimeout(5)
        assert victim.target_app.recv(100) == b""
        try:
            assert victim.client_app.recv(100) == b""
        except ConnectionResetError:
            pass  # it had unread bytes in flight: a reset is the honest end
        assert victim.relay.client.fileno() == -1 and victim.relay.target.fileno() == -1

        pool.exhausted = False
        healthy.client_app.sendall(b"after")
        healthy.target_app.sendall(b"reply")
        _run_until(loop, lambda: healthy.counters[0] == 11 and healthy.counters[1] == 5)
        assert healthy.target_app.recv(100) == b"after"
        assert healthy.client_app.recv(100) == b"reply"
        assert closed == [victim.relay]
        assert pool.lent == 0  # every pipe lent out came back
    finally:
        healthy.close()
        victim.close()
        pool.close()
        loop.close()
