"""The compiled engine on its own: relay, half-close, aborts, caps, failover, timeouts.

Runs forkproxy.relay._engine against real sockets on loopback with a shared mapping of
the proposed layout (engine_harness.py); skipped when the extension is not built.
"""

from __future__ import annotations

import errno
import hashlib
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.proxy import wait_until
from tests.unit.relay import engine_harness as h

_engine = h.load_engine()
pytestmark = pytest.mark.skipif(_engine is None, reason="the compiled engine is not built")

DEADLINE = 10.0
# Relay tests run with both read paths: always splice, and small reads through a buffer.
COPY_SIZES = pytest.mark.parametrize("copy_size", [0, 16384], ids=["splice", "copy"])


class TargetServer:
    """A target on loopback: each accepted connection is served by `handler` on a thread."""

    def __init__(self, handler: Callable[[socket.socket], None], backlog: int = 128) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.accepted = 0
        self.connections: list[socket.socket] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(DEADLINE)
        try:
            self.handler(conn)
        except Exception as error:  # noqa: BLE001  (reported by the test)
            self.errors.append(error)

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


def recv_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def hold(conn: socket.socket) -> None:
    conn.recv(1)


class Proxy:
    """An engine on one listener, run by a loop thread."""

    def __init__(
        self,
        routes: list[list[h.Target]],
        capacity: int = 100,
        per_source: int = 0,
        entries: int = 0,
        hooks: h.Hooks | None = None,
        **options: Any,
    ) -> None:
        assert _engine is not None
        self.mapping = h.SharedMapping(capacity, per_source=per_source, entries=entries)
        self.listener = h.listener()
        self.port = self.listener.getsockname()[1]
        self.hooks = hooks or h.Hooks()
        self.engine = _engine.Engine(
            self.mapping.memory,
            h.LAYOUT,
            0,
            [(self.listener.fileno(), 0)],
            routes,
            self.hooks,
            **options,
        )
        self.engine.start_accepting()
        self.runner = h.EngineRunner(self.engine)
        self.clients: list[socket.socket] = []

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        client = socket.socket()
        client.bind((source, 0))
        client.settimeout(DEADLINE)
        self.clients.append(client)
        client.connect(("127.0.0.1", self.port))
        return client

    def slot(self, word: int) -> int:
        return self.mapping.slot_word(0, word)

    def open_connections(self) -> int:
        return int(self.runner.call(self.engine.open_connections))

    def close(self) -> None:
        self.runner.stop()
        self.engine.close()
        self.listener.close()
        for client in self.clients:
            client.close()


@pytest.fixture
def proxies() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for thing in made:
        thing.close()


def make(proxies: list[Any], thing: Any) -> Any:
    proxies.append(thing)
    return thing


# -- relaying ----------------------------------------------------------------------------


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


def _abort(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@COPY_SIZES
def test_target_reset_reaches_client_as_reset(proxies: list[Any], copy_size: int) -> None:
    def serve(conn: socket.socket) -> None:
        conn.recv(100)
        conn.sendall(b"partial")
        _abort(conn)

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
    _abort(client)
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


# -- admission -----------------------------------------------------------------------------


def _refused(client: socket.socket) -> bool:
    """True if the proxy closed this client at once (refused), False if it relays."""
    try:
        client.sendall(b"x")
        return client.recv(1) != b"x"
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_cap_is_exact_across_two_forked_workers(proxies: list[Any]) -> None:
    assert _engine is not None
    target = make(proxies, TargetServer(echo))
    mapping = h.SharedMapping(capacity=7, slots=2)
    shared_listener = h.listener()
    children = []
    for slot in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover  (the child)
            try:
                engine = _engine.Engine(
                    mapping.memory,
                    h.LAYOUT,
                    slot,
                    [(shared_listener.fileno(), 0)],
                    [[h.tcp_target(target.port)]],
                    h.Hooks(),
                )
                engine.start_accepting()
                while True:
                    select.select([engine.fileno()], [], [])
                    engine.dispatch()
            finally:
                os._exit(1)
        children.append(pid)
    try:
        port = shared_listener.getsockname()[1]
        # All in the backlog at once: both workers race to accept and admit them.
        clients = [
            socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(40)
        ]
        refused = sorted(_refused(client) for client in clients)
        assert refused.count(False) == 7
        assert refused.count(True) == 33
        assert mapping.held_total() == 7
        assert mapping.slot_word(0, h.REFUSED) + mapping.slot_word(1, h.REFUSED) == 33
        # Capacity comes back when a relayed client leaves.
        for client in clients:
            client.close()
        wait_until(lambda: mapping.held_total() == 0, DEADLINE, "capacity to come back")
        again = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(8)]
        assert sorted(_refused(client) for client in again) == [False] * 7 + [True]
        for client in again:
            client.close()
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        shared_listener.close()


def test_lock_holder_killed_owner_dead_is_recovered(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], per_source=3, entries=8))
    mapping = proxy.mapping
    key = bytes(10) + b"\xff\xff" + socket.inet_aton("127.0.0.9")
    assert _engine is not None
    row = _engine.source_row(key, 8)
    pid = os.fork()
    if pid == 0:  # pragma: no cover  (the child: dies holding the lock, mid-key)
        mapping.lock()
        mapping.set_header(h.SOURCE_DIRTY, row + 1)
        start = h.SOURCE_TABLE + row * h.SOURCE_ROW_BYTES
        mapping.memory[start : start + 8] = key[:8]
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    owner_died = 0x40000000  # FUTEX_OWNER_DIED in the lock word (futex(2), robust lists)
    assert mapping.words[h.MUTEX // 8] & 0xFFFFFFFF & owner_died
    client = proxy.connect()
    assert not _refused(client)  # EOWNERDEAD: taken over, made consistent
    assert mapping.row_key(row) in (b"\xff" * 16, bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1]))
    assert mapping.header(h.SOURCE_DIRTY) == 0
    assert mapping.trylock() == 0  # consistent again: a plain lock from now on
    assert mapping.unlock() == 0
    second = proxy.connect()
    assert not _refused(second)
    assert mapping.held_total() == 2


def test_per_source_limit_is_exact(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], per_source=2, entries=16))
    first = [proxy.connect("127.0.0.1") for _ in range(3)]
    assert [_refused(client) for client in first] == [False, False, True]
    other = [proxy.connect("127.0.0.2") for _ in range(3)]
    assert [_refused(client) for client in other] == [False, False, True]
    assert proxy.mapping.held_total() == 4
    first[0].close()
    wait_until(lambda: proxy.mapping.held_total() == 3, DEADLINE, "a unit to come back")
    again = proxy.connect("127.0.0.1")
    assert not _refused(again)
    codes = [event[0] for event in proxy.hooks.events]
    assert _engine is not None and _engine.EVENT_REFUSED_SOURCE in codes


def test_per_source_table_reuses_rows_of_gone_sources(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], per_source=1, entries=4))
    for round_ in range(3):
        clients = [proxy.connect(f"127.0.{round_}.{i + 1}") for i in range(4)]
        assert [_refused(client) for client in clients] == [False] * 4
        for client in clients:
            client.close()
        wait_until(lambda: proxy.mapping.held_total() == 0, DEADLINE, "units back")
    for row in range(4):
        assert proxy.mapping.row_counts(row, 1) == [0]


def test_global_cap_refusal_is_counted_and_reported(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(hold))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], capacity=2))
    clients = [proxy.connect() for _ in range(2)]
    wait_until(lambda: target.accepted == 2, DEADLINE, "two relayed")
    refused = proxy.connect()
    assert refused.recv(1) == b""
    assert proxy.slot(h.REFUSED) == 1
    assert _engine is not None
    wait_until(
        lambda: [e[0] for e in proxy.hooks.events] == [_engine.EVENT_REFUSED_CAP],
        DEADLINE,
        "the refusal event",
    )
    code, count, _, (listener, client) = proxy.hooks.events[0]
    assert (count, listener) == (1, 0)
    assert isinstance(client, str) and client.startswith("127.0.0.1:")
    for client_sock in clients:
        client_sock.close()


# -- connecting ----------------------------------------------------------------------------


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def test_failover_to_the_second_target(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    dead = h.tcp_target(_closed_port())
    proxy = make(proxies, Proxy([[dead, h.tcp_target(target.port)]]))
    for _ in range(3):
        client = proxy.connect()
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"hello"
        client.close()
    assert _engine is not None
    wait_until(lambda: proxy.hooks.events, DEADLINE, "the target failure event")
    code, count, error, (route, failed) = proxy.hooks.events[0]
    assert (code, route, failed, error) == (
        _engine.EVENT_TARGET_FAILED,
        0,
        dead,
        errno.ECONNREFUSED,
    )
    assert proxy.slot(h.CONNECT_ERRORS) == 0


def test_every_target_failing_closes_the_client(proxies: list[Any]) -> None:
    proxy = make(proxies, Proxy([[h.tcp_target(_closed_port()), h.tcp_target(_closed_port())]]))
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
    assert _engine is not None
    wait_until(lambda: proxy.hooks.events, DEADLINE, "the event")
    assert proxy.hooks.events[0][:3] == (_engine.EVENT_CONNECT_FAILED, 1, errno.ETIMEDOUT)


def test_idle_timeout_closes_a_quiet_relay(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(hold))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], idle_timeout=0.3))
    busy = proxy.connect()
    quiet = proxy.connect()
    started = time.monotonic()
    for _ in range(8):  # busy keeps moving bytes for longer than the timeout
        busy.sendall(b"x")
        time.sleep(0.1)
    assert recv_all(quiet) == b""  # closed by the engine
    assert time.monotonic() - started >= 0.3
    busy.sendall(b"still here")
    assert proxy.open_connections() == 1
    assert recv_all(busy) == b""


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


# -- lifecycle -------------------------------------------------------------------------------


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


def test_close_all_ends_everything(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(hold))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]]))
    clients = [proxy.connect() for _ in range(3)]
    wait_until(lambda: target.accepted == 3, DEADLINE, "three relayed")
    proxy.runner.call(proxy.engine.close_all)
    for client in clients:
        assert recv_all(client) == b""
    assert proxy.open_connections() == 0
    assert proxy.mapping.held_total() == 0


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_sent_first(proxies: list[Any], version: int) -> None:
    try:
        from forkproxy.relay.proxy_protocol import header_encoder  # type: ignore[import-not-found]
    except ImportError:
        from forkproxy.proxy_protocol import header_encoder
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
    try:
        from forkproxy.relay.proxy_protocol import header_encoder
    except ImportError:
        from forkproxy.proxy_protocol import header_encoder
    hosts = _ipv4 if family == socket.AF_INET else st.one_of(_ipv6_groups, _mapped)
    client = (data.draw(hosts), data.draw(_port))
    local = (data.draw(hosts), data.draw(_port))
    assert _engine is not None
    expected = header_encoder(version)(client, local, family)
    assert _engine.encode_proxy_header(version, family, client, local) == expected


def test_proxy_header_for_unix_clients() -> None:
    from forkproxy.proxy_protocol import encode_v1, encode_v2

    assert _engine is not None
    assert _engine.encode_proxy_header(1, socket.AF_UNIX, "", "") == encode_v1("", "", 1)
    assert _engine.encode_proxy_header(2, socket.AF_UNIX, "", "") == encode_v2("", "", 1)


def test_layout_that_does_not_fit_is_refused() -> None:
    assert _engine is not None
    mapping = h.SharedMapping(1)
    bad = dict(h.LAYOUT, max_slots=100000)
    with pytest.raises(ValueError, match="layout"):
        _engine.Engine(mapping.memory, bad, 0, [], [], h.Hooks())
    missing = {k: v for k, v in h.LAYOUT.items() if k != "held"}
    with pytest.raises(KeyError):
        _engine.Engine(mapping.memory, missing, 0, [], [], h.Hooks())


def test_queue_mode_holds_a_client_until_capacity_returns(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], capacity=1, queue_on_limit=True))
    waits = proxy.hooks.capacity_waits
    first = proxy.connect()
    first.sendall(b"1")
    assert first.recv(1) == b"1"
    second = proxy.connect()
    second.sendall(b"2")
    wait_until(lambda: waits, DEADLINE, "on_capacity_wait")
    assert proxy.mapping.header32(h.WAITERS) == 1
    assert proxy.runner.call(proxy.engine.retry_held) is False  # still full
    seq = proxy.mapping.header32(h.CAPACITY_SEQ)
    first.close()  # the release sees a waiter: CAPACITY_SEQ moves (and a futex wake)
    wait_until(lambda: proxy.mapping.header32(h.CAPACITY_SEQ) != seq, DEADLINE, "the wake")
    assert proxy.runner.call(proxy.engine.retry_held) is True
    assert second.recv(1) == b"2"
    assert proxy.mapping.header32(h.WAITERS) == 0
    assert proxy.slot(h.REFUSED) == 0


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
