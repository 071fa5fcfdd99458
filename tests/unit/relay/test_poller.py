"""The worker's nested epoll: readiness callbacks, interest changes, closed and reused fds."""

import socket
from collections.abc import Callable, Iterator

import pytest
import uvloop

from forkproxy.relay.poller import Poller


@pytest.fixture
def loop() -> Iterator[uvloop.Loop]:
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def poller(loop: uvloop.Loop) -> Iterator[Poller]:
    poller = Poller(loop)
    yield poller
    poller.close()


def _turns(loop: uvloop.Loop, count: int = 3) -> None:
    """Let the loop run a few iterations (each polls our epoll once if it is ready)."""
    for _ in range(count):
        loop.run_until_complete(_one_turn(loop))


async def _one_turn(loop: uvloop.Loop) -> None:
    future = loop.create_future()
    loop.call_soon(future.set_result, None)
    await future


def _pair() -> tuple[socket.socket, socket.socket]:
    near, far = socket.socketpair()
    near.setblocking(False)
    return near, far


def _recorder(log: list[str], name: str) -> Callable[[], None]:
    return lambda: log.append(name)


def test_reader_runs_while_readable_and_stops_when_removed(
    loop: uvloop.Loop, poller: Poller
) -> None:
    near, far = _pair()
    with near, far:
        calls: list[str] = []
        poller.add_reader(near.fileno(), _recorder(calls, "read"))
        _turns(loop)
        assert calls == []  # nothing to read yet
        far.send(b"x")
        _turns(loop)
        assert calls and set(calls) == {"read"}  # level-triggered: again while unread
        poller.remove_reader(near.fileno())
        calls.clear()
        _turns(loop)
        assert calls == []
        assert poller.watching() == 0


def test_reader_and_writer_on_one_fd(loop: uvloop.Loop, poller: Poller) -> None:
    near, far = _pair()
    with near, far:
        calls: list[str] = []
        poller.add_writer(near.fileno(), _recorder(calls, "write"))
        _turns(loop, 1)
        assert set(calls) == {"write"}  # an empty send buffer is writable
        poller.add_reader(near.fileno(), _recorder(calls, "read"))
        poller.remove_writer(near.fileno())
        far.send(b"x")
        calls.clear()
        _turns(loop, 1)
        assert set(calls) == {"read"}  # the writer is gone, the reader stays
        assert poller.watching() == 1


def test_hang_up_wakes_the_reader(loop: uvloop.Loop, poller: Poller) -> None:
    near, far = _pair()
    with near:
        calls: list[str] = []
        poller.add_reader(near.fileno(), _recorder(calls, "read"))
        far.close()
        _turns(loop, 1)
        assert set(calls) == {"read"}
        poller.remove_reader(near.fileno())


def test_forgotten_fd_gets_no_more_callbacks(loop: uvloop.Loop, poller: Poller) -> None:
    near, far = _pair()
    with far:
        calls: list[str] = []
        poller.add_reader(near.fileno(), _recorder(calls, "read"))
        far.send(b"x")
        poller.forget(near.fileno())
        near.close()
        _turns(loop)
        assert calls == []
        assert poller.watching() == 0


def test_an_event_for_a_closed_fd_never_reaches_its_successor(
    loop: uvloop.Loop, poller: Poller
) -> None:
    """Two sockets ready in one batch: the first callback closes the second and a new
    socket gets its number. The batch's event for the old socket must not call the new
    socket's callback (which would take it for ready when it is not)."""
    first, first_far = _pair()
    second, second_far = _pair()
    calls: list[str] = []
    replacement: list[socket.socket] = []

    def on_first() -> None:
        poller.remove_reader(first.fileno())
        if replacement:
            return
        number = second.fileno()
        poller.forget(number)
        second.close()
        new, new_far = _pair()
        replacement.extend((new, new_far))
        assert new.fileno() == number  # the kernel hands out the lowest free number
        poller.add_reader(number, _recorder(calls, "new socket"))

    with first, first_far, second_far:
        poller.add_reader(first.fileno(), on_first)
        poller.add_reader(second.fileno(), _recorder(calls, "old socket"))
        # Both readable before the loop looks, so both come in one batch. The first
        # registered is not always dispatched first: run until on_first has run.
        first_far.send(b"x")
        second_far.send(b"x")
        _turns(loop, 1)
        assert replacement, "on_first did not run"
        if calls == ["old socket"]:
            pytest.skip("the kernel reported the second socket first: nothing to check")
        assert calls == []  # the new socket has nothing to read and was not called
        for sock in replacement:
            sock.close()


def test_close_stops_watching_with_the_loop(loop: uvloop.Loop) -> None:
    poller = Poller(loop)
    near, far = _pair()
    with near, far:
        calls: list[str] = []
        poller.add_reader(near.fileno(), _recorder(calls, "read"))
        poller.close()
        far.send(b"x")
        _turns(loop)
        assert calls == []


def test_an_exception_in_a_callback_goes_to_on_error_and_the_batch_goes_on(
    loop: uvloop.Loop,
) -> None:
    errors: list[tuple[int, str]] = []
    poller = Poller(loop, lambda fd, error: errors.append((fd, str(error))))
    broken, broken_far = _pair()
    healthy, healthy_far = _pair()
    calls: list[str] = []

    def raises() -> None:
        calls.append("broken")
        raise RuntimeError("callback bug")

    with broken, broken_far, healthy, healthy_far:
        poller.add_reader(broken.fileno(), raises)
        poller.add_reader(healthy.fileno(), _recorder(calls, "healthy"))
        broken_far.send(b"x")
        healthy_far.send(b"x")  # both ready in one batch, in whichever order
        _turns(loop)
        assert errors == [(broken.fileno(), "callback bug")]  # once: then no longer watched
        assert calls.count("broken") == 1 and "healthy" in calls
        assert poller.watching() == 1  # the healthy one only
        calls.clear()
        _turns(loop)
        assert set(calls) == {"healthy"}  # still readable, still served
    poller.close()


def test_without_on_error_an_exception_propagates(loop: uvloop.Loop) -> None:
    poller = Poller(loop)
    escaped: list[object] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context.get("exception")))
    near, far = _pair()

    def raises() -> None:
        raise RuntimeError("callback bug")

    with near, far:
        poller.add_reader(near.fileno(), raises)
        far.send(b"x")
        _turns(loop, 1)
        assert escaped and {str(error) for error in escaped} == {"callback bug"}
        assert poller.peer_closed == 0
        poller.remove_reader(near.fileno())
    poller.close()
