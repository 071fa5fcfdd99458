"""Connect and idle timeouts: the sweeps, the relay's activity flag, and connect expiry.

Deadlines are checked by passing `now` explicitly: nothing here waits for time to pass.
"""

import asyncio
import errno
import math
import socket
from collections.abc import Iterator

import pytest
import uvloop

from forkproxy.relay.poller import Poller
from forkproxy.relay.splice import Direction, IdleDirection, PipePool, Relay
from forkproxy.relay.target_connect import TargetConnect
from forkproxy.relay.timeouts import (
    SWEEP_INTERVAL_MAX,
    SWEEP_INTERVAL_MIN,
    LazySweep,
    sweep_connects,
    sweep_idle,
    sweep_interval,
)
from forkproxy.settings.address import parse_target


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def pool() -> Iterator[PipePool]:
    pool = PipePool(65536, 4)
    yield pool
    pool.close()


def _relay(
    loop: asyncio.AbstractEventLoop, pool: PipePool, direction: type[Direction]
) -> tuple[Relay, socket.socket, socket.socket, list[Relay]]:
    client, client_far = socket.socketpair()
    target, target_far = socket.socketpair()
    for sock in (client, target):
        sock.setblocking(False)
    closed: list[Relay] = []
    counters = memoryview(bytearray(8 * 16)).cast("q")
    relay = Relay(Poller(loop), pool, client, target, counters, 0, 1, closed.append, direction)
    return relay, client_far, target_far, closed


def _unexpected(item: object, error: Exception) -> None:
    raise AssertionError(f"on_error({item!r}, {error!r})")


def test_sweep_interval() -> None:
    assert sweep_interval(8.0) == 1.0
    assert sweep_interval(0.01) == SWEEP_INTERVAL_MIN
    assert sweep_interval(math.inf) == SWEEP_INTERVAL_MAX


def test_idle_direction_marks_the_relay_active(
    loop: asyncio.AbstractEventLoop, pool: PipePool
) -> None:
    relay, client_far, target_far, _ = _relay(loop, pool, IdleDirection)
    with client_far, target_far:
        relay.start()
        client_far.sendall(b"ping")
        loop.run_until_complete(asyncio.sleep(0))  # one loop turn: the read happens
        assert target_far.recv(4) == b"ping"
        assert relay.active
        relay.close()
    plain, client_far, target_far, _ = _relay(loop, pool, Direction)
    with client_far, target_far:
        plain.start()
        client_far.sendall(b"ping")
        loop.run_until_complete(asyncio.sleep(0))
        assert target_far.recv(4) == b"ping"
        assert not plain.active  # without --idle-timeout nothing is recorded
        plain.close()


def test_sweep_idle_closes_only_the_quiet(loop: asyncio.AbstractEventLoop, pool: PipePool) -> None:
    timeout = 8.0
    quiet, *quiet_ends, quiet_closed = _relay(loop, pool, IdleDirection)
    busy, *busy_ends, busy_closed = _relay(loop, pool, IdleDirection)
    quiet.quiet_since = busy.quiet_since = 100.0
    interval = sweep_interval(timeout)
    now = 100.0
    while now < 100.0 + 3 * timeout:
        now += interval
        if now % (timeout / 2) < interval:  # a byte every half timeout
            busy.active = True
        sweep_idle([quiet, busy], now, timeout, _unexpected)
        if quiet.closed:
            break
    assert quiet_closed == [quiet]
    assert quiet.error is not None and quiet.error.errno == errno.ETIMEDOUT
    assert 100.0 + timeout <= now <= 100.0 + timeout + interval
    assert not busy.closed and busy_closed == []
    busy.close()
    for end in (*quiet_ends, *busy_ends):
        end.close()


def test_lazy_sweep_runs_while_watched(loop: asyncio.AbstractEventLoop) -> None:
    watched = {1, 2}
    calls: list[float] = []

    def sweep(now: float) -> None:
        calls.append(now)
        watched.pop()

    lazy = LazySweep(loop, 0.001, watched, sweep)
    lazy.arm()
    lazy.arm()  # armed already: one timer
    assert lazy.armed
    while lazy.armed:
        loop.run_until_complete(asyncio.sleep(0.001))
    assert len(calls) == 2 and not watched  # re-armed once, then nothing left to watch


class _BrokenRelay(Relay):
    """A relay whose abort raises, as a bug in its teardown would."""

    __slots__ = ()

    def fail(self, error: OSError) -> None:
        raise RuntimeError("broken teardown")


def test_sweep_idle_hands_a_failing_relay_to_on_error_and_goes_on(
    loop: asyncio.AbstractEventLoop, pool: PipePool
) -> None:
    client, client_far = socket.socketpair()
    target, target_far = socket.socketpair()
    counters = memoryview(bytearray(8 * 16)).cast("q")
    broken = _BrokenRelay(Poller(loop), pool, client, target, counters, 0, 1, lambda r: None)
    quiet, *ends, quiet_closed = _relay(loop, pool, IdleDirection)
    broken.quiet_since = quiet.quiet_since = 0.0
    errors: list[tuple[object, Exception]] = []
    sweep_idle([broken, quiet], 10.0, 1.0, lambda item, error: errors.append((item, error)))
    assert [(item, str(error)) for item, error in errors] == [(broken, "broken teardown")]
    assert quiet_closed == [quiet]  # the one after it was swept all the same
    broken.close()
    for end in (client_far, target_far, *ends):
        end.close()


class _Attempt:
    def __init__(self, raises: bool) -> None:
        self.raises = raises
        self.expired = False

    def expire(self, now: float) -> bool:
        if self.raises:
            raise ValueError("broken attempt")
        self.expired = True
        return True


def test_sweep_connects_hands_a_failing_attempt_to_on_error_and_goes_on() -> None:
    broken, fine = _Attempt(raises=True), _Attempt(raises=False)
    errors: list[tuple[object, Exception]] = []
    sweep_connects([broken, fine], 1.0, lambda item, error: errors.append((item, error)))
    assert [(item, str(error)) for item, error in errors] == [(broken, "broken attempt")]
    assert fine.expired


def test_lazy_sweep_is_armed_again_after_its_sweep_raised(
    loop: asyncio.AbstractEventLoop,
) -> None:
    watched = {1, 2}
    calls: list[float] = []
    escaped: list[object] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context.get("exception")))

    def sweep(now: float) -> None:
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("first sweep fails")
        watched.clear()

    lazy = LazySweep(loop, 0.001, watched, sweep)
    lazy.arm()
    while lazy.armed:
        loop.run_until_complete(asyncio.sleep(0.001))
    assert len(calls) == 2 and not watched  # the failure did not end the sweeping
    assert [str(error) for error in escaped] == ["first sweep fails"]


@pytest.fixture
def never_accepting() -> Iterator[tuple[str, int]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)  # room for one: the filler; the kernel drops later SYNs
    filler = socket.create_connection(server.getsockname(), timeout=5)
    yield server.getsockname()
    filler.close()
    server.close()


def test_connect_expires_at_its_deadline(
    loop: asyncio.AbstractEventLoop, never_accepting: tuple[str, int]
) -> None:
    host, port = never_accepting
    failures: list[OSError] = []
    connect = TargetConnect(
        loop,
        Poller(loop),
        parse_target(f"{host}:{port}"),
        lambda s: s.close(),
        failures.append,
        5.0,
    )
    connect.start()
    deadline = connect.deadline
    assert not math.isinf(deadline)
    assert not connect.expire(deadline - 0.001)
    assert failures == []
    assert connect.expire(deadline)
    assert [error.errno for error in failures] == [errno.ETIMEDOUT]
    assert not connect.expire(deadline + 100)  # finished: nothing more happens


def test_no_timeout_means_no_deadline(loop: asyncio.AbstractEventLoop) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        target = parse_target(f"127.0.0.1:{server.getsockname()[1]}")
        connected: list[socket.socket] = []
        connect = TargetConnect(loop, Poller(loop), target, connected.append, lambda e: None)
        connect.start()
        assert math.isinf(connect.deadline)
        assert not connect.expire(1e18)
        while not connected:
            loop.run_until_complete(asyncio.sleep(0.001))
        connected[0].close()
