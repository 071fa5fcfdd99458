"""The compiled engine connecting: failover, connect and idle timeouts, name resolution."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.proxy import wait_until
from tests.unit.relay import engine_harness as h
from tests.unit.relay.engine_proxy import (
    DEADLINE,
    Proxy,
    TargetServer,
    closed_port,
    echo,
    engine_module,
    hold,
    make,
    recv_all,
    reset_after,
)

pytestmark = pytest.mark.skipif(engine_module is None, reason="the compiled engine is not built")


@pytest.fixture
def proxies() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for thing in made:
        thing.close()


def test_failover_to_the_second_target(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    dead = h.tcp_target(closed_port())
    proxy = make(proxies, Proxy([[dead, h.tcp_target(target.port)]]))
    for _ in range(3):
        client = proxy.connect()
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"hello"
        client.close()
    assert engine_module is not None
    wait_until(lambda: proxy.hooks.events, DEADLINE, "the target failure event")
    code, count, error, (route, failed) = proxy.hooks.events[0]
    assert (code, route, failed, error) == (
        engine_module.EVENT_TARGET_FAILED,
        0,
        dead,
        errno.ECONNREFUSED,
    )
    assert proxy.slot(h.CONNECT_ERRORS) == 0


def test_every_target_failing_closes_the_client(proxies: list[Any]) -> None:
    proxy = make(proxies, Proxy([[h.tcp_target(closed_port()), h.tcp_target(closed_port())]]))
    client = proxy.connect()
    assert recv_all(client) == b""
    wait_until(lambda: proxy.slot(h.CONNECT_ERRORS) == 1, DEADLINE, "the connect error")
    assert proxy.mapping.held_total() == 0
    assert proxy.slot(h.ACTIVE) == 0


def test_connect_timeout(proxies: list[Any]) -> None:
    # A target whose accept queue is full drops SYNs: the connect never completes.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    proxies.append(full)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    proxies.extend(fillers)
    proxy = make(proxies, Proxy([[h.tcp_target(port)]], connect_timeout=0.3))
    client = proxy.connect()
    assert recv_all(client) == b""
    assert proxy.slot(h.CONNECT_ERRORS) == 1
    assert engine_module is not None
    wait_until(lambda: proxy.hooks.events, DEADLINE, "the event")
    assert proxy.hooks.events[0][:3] == (engine_module.EVENT_CONNECT_FAILED, 1, errno.ETIMEDOUT)


def test_idle_timeout_closes_a_quiet_relay(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(hold))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], idle_timeout=0.3))
    busy = proxy.connect()
    quiet = proxy.connect()
    started = time.monotonic()
    for _ in range(8):  # busy keeps moving bytes for longer than the timeout
        busy.sendall(b"x")
        time.sleep(0.1)
    assert reset_after(quiet) == b""  # aborted by the engine
    assert time.monotonic() - started >= 0.3
    busy.sendall(b"still here")
    assert proxy.open_connections() == 1
    assert reset_after(busy) == b""


def test_host_name_target_is_resolved_through_the_hook(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.name_target("target.example", target.port)]]))

    def answer(token: int, host: str, port: int) -> None:
        proxy.engine.resolved(token, [(socket.AF_INET, ("127.0.0.1", port))])

    proxy.hooks.resolver = answer
    client = proxy.connect()
    client.sendall(b"named")
    client.shutdown(socket.SHUT_WR)
    assert recv_all(client) == b"named"
    assert proxy.hooks.resolves[0][1:] == ("target.example", target.port)


def test_a_raising_resolve_hook_leaks_nothing(proxies: list[Any]) -> None:
    proxy = make(proxies, Proxy([[h.name_target("target.example", 1)]]))

    def broken(token: int, host: str, port: int) -> None:
        raise RuntimeError("resolver bug")

    proxy.hooks.resolver = broken
    client = proxy.connect()
    assert recv_all(client) == b""
    wait_until(lambda: proxy.runner.errors, DEADLINE, "the exception")
    assert isinstance(proxy.runner.errors[0], RuntimeError)
    assert proxy.open_connections() == 0
    assert proxy.mapping.held_total() == 0
    assert proxy.slot(h.CONNECT_ERRORS) == 1


def test_late_resolve_answer_after_timeout_is_ignored(proxies: list[Any]) -> None:
    proxy = make(proxies, Proxy([[h.name_target("slow.example", 1)]], connect_timeout=0.2))
    client = proxy.connect()
    assert recv_all(client) == b""
    token = proxy.hooks.resolves[0][0]
    assert proxy.runner.call(lambda: proxy.engine.resolved(token, [])) is False
    assert proxy.open_connections() == 0
