"""The compiled engine's API: drain, close_all, hooks that raise, the PROXY header it
sends (byte-identical to proxy_protocol.py), the layout check."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkproxy.relay.proxy_protocol import encode_v1, encode_v2, header_encoder
from tests.support.proxy import wait_until
from tests.unit.relay import engine_harness as h
from tests.unit.relay.engine_proxy import (
    DEADLINE,
    Proxy,
    TargetServer,
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


def test_drain_reports_once_the_last_connection_closes(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]]))
    client = proxy.connect()
    client.sendall(b"a")
    assert client.recv(1) == b"a"
    proxy.runner.call(lambda: proxy.engine.stop_accepting(drain=True))
    assert proxy.hooks.drained == 0
    client.shutdown(socket.SHUT_WR)
    assert recv_all(client) == b""
    wait_until(lambda: proxy.hooks.drained == 1, DEADLINE, "on_drained")


def test_close_all_aborts_everything(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(lambda conn: None))  # the test reads them
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]]))
    clients = [proxy.connect() for _ in range(3)]
    wait_until(lambda: target.accepted == 3, DEADLINE, "three relayed")
    proxy.runner.call(proxy.engine.close_all)
    for client in clients:
        assert reset_after(client) == b""  # the graceful timeout aborts, as the reference
    for conn in target.connections:
        assert reset_after(conn) == b""
    assert proxy.open_connections() == 0
    assert proxy.mapping.held_total() == 0


def test_a_raising_on_event_hook_is_raised_after_the_work(proxies: list[Any]) -> None:
    class Broken(h.Hooks):
        def on_event(self, code: int, count: int, error: int, detail: tuple[int, object]) -> None:
            raise ValueError("logging bug")

    target = make(proxies, TargetServer(hold))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], capacity=0, hooks=Broken()))
    refused = proxy.connect()
    assert recv_all(refused) == b""
    wait_until(lambda: proxy.runner.errors, DEADLINE, "the hook's exception")
    assert isinstance(proxy.runner.errors[0], ValueError)
    assert proxy.slot(h.REFUSED) == 1
    assert proxy.open_connections() == 0


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_sent_first(proxies: list[Any], version: int) -> None:
    received = bytearray()

    def serve(conn: socket.socket) -> None:
        while data := conn.recv(1000):
            received.extend(data)

    target = make(proxies, TargetServer(serve))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], proxy_protocol=version))
    client = proxy.connect()
    client.sendall(b"payload")
    client.shutdown(socket.SHUT_WR)
    expected = header_encoder(version)(client.getsockname(), client.getpeername(), socket.AF_INET)
    wait_until(lambda: bytes(received) == expected + b"payload", DEADLINE, "header and data")


_ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
_ipv6_groups = st.lists(st.one_of(st.just(0), st.integers(0, 0xFFFF)), min_size=8, max_size=8).map(
    lambda groups: socket.inet_ntop(socket.AF_INET6, struct.pack("!8H", *groups))
)
_mapped = _ipv4.map(lambda a: "::ffff:" + a)
_port = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(
    version=st.sampled_from([1, 2]),
    family=st.sampled_from([socket.AF_INET, socket.AF_INET6]),
    data=st.data(),
)
def test_proxy_header_matches_the_python_encoder(version: int, family: int, data: Any) -> None:
    hosts = _ipv4 if family == socket.AF_INET else st.one_of(_ipv6_groups, _mapped)
    client = (data.draw(hosts), data.draw(_port))
    local = (data.draw(hosts), data.draw(_port))
    assert engine_module is not None
    expected = header_encoder(version)(client, local, family)
    assert engine_module.encode_proxy_header(version, family, client, local) == expected


def test_proxy_header_for_unix_clients() -> None:
    assert engine_module is not None
    assert engine_module.encode_proxy_header(1, socket.AF_UNIX, "", "") == encode_v1("", "", 1)
    assert engine_module.encode_proxy_header(2, socket.AF_UNIX, "", "") == encode_v2("", "", 1)


def test_layout_that_does_not_fit_is_refused() -> None:
    assert engine_module is not None
    mapping = h.SharedMapping(1)
    bad = dict(h.LAYOUT, max_slots=100000)
    with pytest.raises(ValueError, match="layout"):
        engine_module.Engine(mapping.memory, bad, 0, [], [], h.Hooks())
    missing = {k: v for k, v in h.LAYOUT.items() if k != "held"}
    with pytest.raises(KeyError):
        engine_module.Engine(mapping.memory, missing, 0, [], [], h.Hooks())
