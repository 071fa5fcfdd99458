"""The compiled engine relaying: bytes both ways, half-close, aborts, urgent data, stalls."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.proxy import wait_until
from tests.unit.relay import engine_harness as h
from tests.unit.relay.engine_proxy import (
    COPY_SIZES,
    DEADLINE,
    Proxy,
    TargetServer,
    abort,
    echo,
    engine_module,
    make,
    recv_all,
)

pytestmark = pytest.mark.skipif(engine_module is None, reason="the compiled engine is not built")


@pytest.fixture
def proxies() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for thing in made:
        thing.close()


@COPY_SIZES
def test_bytes_both_ways_large_random(proxies: list[Any], copy_size: int) -> None:
    to_target = os.urandom(3 << 20)
    to_client = os.urandom(5 << 20)
    received: dict[str, bytes] = {}

    def serve(conn: socket.socket) -> None:
        sender = threading.Thread(target=conn.sendall, args=(to_client,))
        sender.start()
        received["target"] = recv_all(conn)
        sender.join()
        conn.shutdown(socket.SHUT_WR)

    target = make(proxies, TargetServer(serve))
    proxy = make(
        proxies, Proxy([[h.tcp_target(target.port)]], copy_size=copy_size, pipe_size=65536)
    )
    client = proxy.connect()
    sender = threading.Thread(target=lambda: (client.sendall(to_target), client.shutdown(1)))
    sender.start()
    got = recv_all(client)
    sender.join()
    client.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(to_client).digest()
    wait_until(lambda: "target" in received, DEADLINE, "the target's bytes")
    assert hashlib.sha256(received["target"]).digest() == hashlib.sha256(to_target).digest()
    wait_until(lambda: proxy.open_connections() == 0, DEADLINE, "the relay to close")
    assert proxy.slot(h.BYTES_TO_TARGET) == len(to_target)
    assert proxy.slot(h.BYTES_TO_CLIENT) == len(to_client)
    assert proxy.slot(h.ACCEPTED) == proxy.slot(h.CLOSED) == 1
    assert proxy.slot(h.ACTIVE) == 0
    assert proxy.mapping.held_total() == 0
    assert sum(proxy.slot(h.CONNECT_DURATION_BUCKETS + i) for i in range(15)) == 1
    assert sum(proxy.slot(h.CONNECTION_DURATION_BUCKETS + i) for i in range(13)) == 1
    assert proxy.slot(h.CONNECTION_DURATION_SUM_NS) > 0
    assert proxy.hooks.idle == 1
    assert not target.errors


@COPY_SIZES
def test_many_concurrent_connections(proxies: list[Any], copy_size: int) -> None:
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], copy_size=copy_size))
    clients = [proxy.connect() for _ in range(50)]
    payloads = [os.urandom(1000 + 37 * i) for i in range(len(clients))]
    for client, payload in zip(clients, payloads, strict=True):
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
    for client, payload in zip(clients, payloads, strict=True):
        assert recv_all(client) == payload
        client.close()
    wait_until(lambda: proxy.open_connections() == 0, DEADLINE, "every relay to close")
    assert proxy.mapping.held_total() == 0
    assert proxy.slot(h.CLOSED) == 50


@COPY_SIZES
def test_half_close_each_way(proxies: list[Any], copy_size: int) -> None:
    def serve(conn: socket.socket) -> None:
        request = recv_all(conn)  # the client's FIN arrives as EOF...
        conn.sendall(b"reply to " + request)  # ...while this way stays open
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(1) == b""

    target = make(proxies, TargetServer(serve))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], copy_size=copy_size))
    client = proxy.connect()
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert recv_all(client) == b"reply to request"
    client.close()
    wait_until(lambda: proxy.open_connections() == 0, DEADLINE, "the relay to close")
    assert not target.errors


@COPY_SIZES
def test_target_reset_reaches_client_as_reset(proxies: list[Any], copy_size: int) -> None:
    def serve(conn: socket.socket) -> None:
        conn.recv(100)
        conn.sendall(b"partial")
        abort(conn)

    target = make(proxies, TargetServer(serve))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], copy_size=copy_size))
    client = proxy.connect()
    client.sendall(b"go")
    with pytest.raises(ConnectionResetError):
        while client.recv(100):
            pass
    client.close()
    wait_until(lambda: proxy.open_connections() == 0, DEADLINE, "the relay to close")


@COPY_SIZES
def test_client_reset_reaches_target_as_reset(proxies: list[Any], copy_size: int) -> None:
    outcome: list[object] = []
    got_data = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.recv(100)
        got_data.set()
        try:
            while conn.recv(100):
                pass
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")

    target = make(proxies, TargetServer(serve))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], copy_size=copy_size))
    client = proxy.connect()
    client.sendall(b"upload")
    assert got_data.wait(DEADLINE)
    abort(client)
    wait_until(lambda: outcome, DEADLINE, "the target to see the end")
    assert outcome == ["reset"]


def test_clean_close_stays_a_fin(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]]))
    client = proxy.connect()
    client.sendall(b"x" * 1000)
    client.shutdown(socket.SHUT_WR)
    assert recv_all(client) == b"x" * 1000  # ends with EOF, no reset


@COPY_SIZES
def test_urgent_data_is_relayed_inline_without_spinning(proxies: list[Any], copy_size: int) -> None:
    received = bytearray()

    def serve(conn: socket.socket) -> None:
        while data := conn.recv(100):
            received.extend(data)

    target = make(proxies, TargetServer(serve))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], copy_size=copy_size))
    client = proxy.connect()
    client.sendall(b"before")
    wait_until(lambda: bytes(received) == b"before", DEADLINE, "the first bytes")
    client.send(b"!", socket.MSG_OOB)
    client.sendall(b"after")
    wait_until(lambda: bytes(received) == b"before!after", DEADLINE, "bytes past the mark")
    # A relay stuck at the mark would run on every loop turn: the engine goes quiet.
    before = proxy.runner.call(proxy.engine.stats)["dispatches"]
    ready, _, _ = select.select([proxy.engine.fileno()], [], [], 0.3)
    after = proxy.runner.call(proxy.engine.stats)["dispatches"]
    assert after - before < 5
    client.send(b"?", socket.MSG_OOB)
    client.sendall(b"end")
    client.shutdown(socket.SHUT_WR)
    wait_until(
        lambda: bytes(received) == b"before!after?end", DEADLINE, f"the second mark {received!r}"
    )
    client.close()


@COPY_SIZES
def test_a_stalled_reader_stops_the_relay_without_spinning(
    proxies: list[Any], copy_size: int
) -> None:
    payload = os.urandom(48 << 20)
    sent = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.sendall(payload)
        sent.set()
        conn.shutdown(socket.SHUT_WR)

    target = make(proxies, TargetServer(serve))
    proxy = make(
        proxies, Proxy([[h.tcp_target(target.port)]], pipe_size=65536, copy_size=copy_size)
    )
    client = proxy.connect()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    # The client reads nothing: once the buffers and the one pipe are full, nothing moves.
    wait_until(
        lambda: (
            proxy.slot(h.BYTES_TO_CLIENT) > 0 and proxy.runner.call(proxy.engine.stats)["relaying"]
        ),
        DEADLINE,
        "bytes to flow",
    )
    moved = -1
    while moved != proxy.slot(h.BYTES_TO_CLIENT):
        moved = proxy.slot(h.BYTES_TO_CLIENT)
        select.select([], [], [], 0.2)
    assert not sent.is_set()
    assert moved < len(payload)
    stats = proxy.runner.call(proxy.engine.stats)
    assert stats["pipes_in_use"] <= 1
    select.select([], [], [], 0.3)
    assert proxy.runner.call(proxy.engine.stats)["dispatches"] - stats["dispatches"] < 5
    received = recv_all(client)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_unix_socket_target(proxies: list[Any], tmp_path: Any) -> None:
    path = str(tmp_path / "target.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    proxies.append(server)
    unix = h.Target(path, socket.AF_UNIX, "", 0, path)
    proxy = make(proxies, Proxy([[unix]], proxy_protocol=2))
    client = proxy.connect()
    client.sendall(b"over unix")
    client.shutdown(socket.SHUT_WR)
    conn, _ = server.accept()
    proxies.append(conn)
    conn.settimeout(DEADLINE)
    header = conn.recv(28)  # v2 TCP4: 16 + 12 bytes
    assert header[12:14] == b"\x21\x11"
    assert recv_all(conn) == b"over unix"
    conn.sendall(b"back")
    conn.close()
    assert recv_all(client) == b"back"
