"""Test helpers for the compiled engine: an engine on a listener, run on a loop thread,
and targets served by threads. Tests only."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.unit.relay import engine_harness as h

engine_module = h.load_engine()

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


def reset_after(sock: socket.socket) -> bytes:
    """What `sock` reads before the proxy's RST (an abort); AssertionError on a clean EOF."""
    chunks: list[bytes] = []
    try:
        while data := sock.recv(1 << 16):
            chunks.append(data)
    except ConnectionResetError:
        return b"".join(chunks)
    raise AssertionError(f"a clean EOF after {sum(map(len, chunks))} bytes, not an RST")


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
        slots: int = 1,
        **options: Any,
    ) -> None:
        assert engine_module is not None
        self.mapping = h.SharedMapping(capacity, slots, per_source=per_source, entries=entries)
        self.listener = h.listener()
        self.port = self.listener.getsockname()[1]
        self.hooks = hooks or h.Hooks()
        self.engine = engine_module.Engine(
            self.mapping.memory,
            h.LAYOUT,
            0,
            [(self.listener.fileno(), 0, per_source)],
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


def make(proxies: list[Any], thing: Any) -> Any:
    proxies.append(thing)
    return thing


def abort(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def was_refused(client: socket.socket) -> bool:
    """True if the proxy closed this client at once (refused), False if it relays."""
    try:
        client.sendall(b"x")
        return client.recv(1) != b"x"
    except (ConnectionResetError, BrokenPipeError):
        return True


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port
