"""Target choice: round-robin, cool-down, failover with real sockets."""

import asyncio
import errno
import socket
from collections.abc import Iterator

import pytest
import uvloop

from forkproxy.relay.poller import Poller
from forkproxy.relay.target_connect import attempt_error
from forkproxy.relay.targets import COOLDOWN, TargetGroup
from forkproxy.settings.address import TargetAddress, parse_target


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


def _dead_target() -> TargetAddress:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return parse_target(f"127.0.0.1:{probe.getsockname()[1]}")


def _connect(
    group: TargetGroup, loop: asyncio.AbstractEventLoop
) -> "asyncio.Future[socket.socket]":
    future: asyncio.Future[socket.socket] = loop.create_future()

    def on_connected(sock: socket.socket, index: int = -1) -> None:
        future.set_result(sock)

    group.connect(loop, Poller(loop), on_connected, future.set_exception)
    return future


def test_round_robin_and_cooldown() -> None:
    clock = Clock()
    failures: list[tuple[str, bool]] = []
    targets = [parse_target(f"10.0.0.{n}:80") for n in (1, 2, 3)]

    def group() -> TargetGroup:
        return TargetGroup(
            targets,
            on_target_failed=lambda target, _, newly: failures.append((target.text, newly)),
            clock=clock,
        )

    refused = OSError(errno.ECONNREFUSED, "refused")
    plain = group()
    assert [plain.order() for _ in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert plain.label == "'10.0.0.1:80' or '10.0.0.2:80' or '10.0.0.3:80'"

    one_down = group()
    one_down.failed(1, refused)
    one_down.failed(1, refused)
    assert failures == [("10.0.0.2:80", True), ("10.0.0.2:80", False)]  # newly, then not
    assert one_down.order() == [0, 2, 1]  # cooling: tried last
    assert one_down.order() == [2, 0, 1]
    clock.now += COOLDOWN
    assert one_down.order() == [2, 0, 1]  # back in the rotation after the cool-down

    two_down = group()
    two_down.failed(0, refused)
    clock.now += 1
    two_down.failed(2, refused)
    assert two_down.order() == [1, 0, 2]  # of the cooling ones, the one back soonest first
    two_down.succeeded(0)
    assert two_down.order() == [1, 0, 2]  # 0 healthy again; rotation starts at 1


def test_failover_skips_a_dead_target(loop: asyncio.AbstractEventLoop) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        live = parse_target(f"127.0.0.1:{server.getsockname()[1]}")
        dead = _dead_target()
        failed: list[str] = []
        group = TargetGroup([dead, live], on_target_failed=lambda t, e, n: failed.append(t.text))
        for _ in range(2):
            sock = loop.run_until_complete(asyncio.wait_for(_connect(group, loop), 10))
            with sock:
                assert sock.getpeername() == server.getsockname()
        assert failed == [dead.text]  # tried once, then cooled down and tried after `live`


def test_every_target_down_fails_with_the_last_error(loop: asyncio.AbstractEventLoop) -> None:
    group = TargetGroup([_dead_target(), _dead_target()])
    with pytest.raises(ConnectionRefusedError):
        loop.run_until_complete(asyncio.wait_for(_connect(group, loop), 10))


def test_one_target_connects_directly(loop: asyncio.AbstractEventLoop) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        target = parse_target(f"127.0.0.1:{server.getsockname()[1]}")
        nodelay = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
        group = TargetGroup([target], options=nodelay)
        with loop.run_until_complete(asyncio.wait_for(_connect(group, loop), 10)) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


# -- a connect that raises instead of returning an errno ------------------------------------

NO_SUCH_INTERFACE = "[fe80::1%fpnosuch0]:80"  # connect() raises socket.gaierror


def test_a_scoped_address_without_its_interface_is_a_failed_attempt(
    loop: asyncio.AbstractEventLoop,
) -> None:
    future = _connect(TargetGroup([parse_target(NO_SUCH_INTERFACE)]), loop)
    assert future.done()  # failed inside connect(), as a refused connect would
    error = future.exception()
    assert isinstance(error, OSError) and not isinstance(error, socket.gaierror)
    assert error.errno == errno.ENODEV
    assert str(error) == "[Errno 19] no network interface 'fpnosuch0' for 'fe80::1%fpnosuch0'"


def test_a_scoped_address_without_its_interface_fails_over(
    loop: asyncio.AbstractEventLoop,
) -> None:
    failed: list[tuple[str, int | None]] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        good = parse_target(f"127.0.0.1:{server.getsockname()[1]}")
        group = TargetGroup(
            [parse_target(NO_SUCH_INTERFACE), good],
            on_target_failed=lambda target, error, _: failed.append((target.text, error.errno)),
        )
        for _ in range(2):  # either target first: round-robin
            sock = loop.run_until_complete(_connect(group, loop))
            assert sock.getpeername() == server.getsockname()
            sock.close()
    assert failed and set(failed) == {(NO_SUCH_INTERFACE, errno.ENODEV)}


def test_any_exception_of_an_attempt_is_a_failed_attempt() -> None:
    assert attempt_error(ValueError("bad"), None).args == (errno.EINVAL, "ValueError: bad")
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert attempt_error(refused, ("127.0.0.1", 1)) is refused
    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert attempt_error(gai, ("fe80::1%x", 80, 0, 0)).errno == errno.ENODEV
    assert attempt_error(gai, ("::1", 80, 0, 0)) is gai  # no scope: as raised
