"""Bytes relayed both ways, intact, for every kind of target and listener."""

import hashlib
import os
import socket
import threading
from pathlib import Path

import pytest

from tests.support.proxy import run_backend, run_proxy, send_all_then_read


@pytest.mark.parametrize(
    ("target_address", "target_of"),
    [
        ("tcp:127.0.0.1:0", lambda b: b.target),
        ("tcp:127.0.0.1:0", lambda b: f"localhost:{b.port}"),
        ("tcp6:::1:0", lambda b: b.target),
        ("unix:{dir}/target.sock", lambda b: b.target),
        ("abstract:fp-target-{pid}", lambda b: b.target),
    ],
    ids=["ipv4", "localhost", "ipv6", "unix-path", "abstract"],
)
def test_every_target_kind_relays(workdir: Path, target_address: str, target_of) -> None:
    address = target_address.format(dir=workdir, pid=os.getpid())
    with (
        run_backend("echo", address) as backend,
        run_proxy(["-w", "2", target_of(backend)], workdir) as proxy,
    ):
        payload = os.urandom(100_000)
        with proxy.connect() as client:
            assert send_all_then_read(client, payload) == payload


@pytest.mark.parametrize("listener", ["tcp", "tcp6", "unix", "abstract"])
def test_every_listener_kind_relays(workdir: Path, listener: str) -> None:
    with (
        run_backend("echo") as backend,
        run_proxy(["-w", "1", backend.target], workdir, listeners=[listener]) as proxy,
        proxy.connect() as client,
    ):
        assert send_all_then_read(client, b"hello through " + listener.encode()) == (
            b"hello through " + listener.encode()
        )


def test_32_concurrent_4mib_echoes_arrive_intact(workdir: Path) -> None:
    with run_backend("echo") as backend, run_proxy(["-w", "2", backend.target], workdir) as proxy:
        results: dict[int, bool] = {}

        def client(index: int) -> None:
            payload = os.urandom(4 << 20)
            with proxy.connect(timeout=60) as sock:
                echoed = send_all_then_read(sock, payload)
            results[index] = hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == {i: True for i in range(32)}


def test_256_mib_one_way_transfer_arrives_intact(workdir: Path) -> None:
    with run_backend("digest") as backend, run_proxy(["-w", "2", backend.target], workdir) as proxy:
        expected = hashlib.sha256()
        with proxy.connect(timeout=120) as client:
            block = os.urandom(1 << 20)
            for i in range(256):
                chunk = block[i:] + block[:i]  # every MiB different
                expected.update(chunk)
                client.sendall(chunk)
            client.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := client.recv(4096):
                reply += chunk
        assert reply.decode().split() == [expected.hexdigest(), str(256 << 20)]


def test_half_close_keeps_the_reply_direction_open(workdir: Path) -> None:
    """The client shuts down writing; the target reads to EOF, then replies in full."""
    with run_backend("digest") as backend, run_proxy(["-w", "1", backend.target], workdir) as proxy:
        request = os.urandom(300_000)
        with proxy.connect() as client:
            reply = send_all_then_read(client, request, half_close=True)
        assert reply.decode().split() == [hashlib.sha256(request).hexdigest(), str(len(request))]


def test_target_eof_reaches_the_client_after_all_bytes(workdir: Path) -> None:
    """The target sends then closes: the client gets every byte, then EOF."""
    from tests.support.backend import pseudo_random

    size = 5_000_000
    with (
        run_backend(f"source:{size}") as backend,
        run_proxy(["-w", "1", backend.target], workdir) as proxy,
        proxy.connect() as client,
    ):
        received = bytearray()
        while chunk := client.recv(1 << 20):
            received += chunk
    assert bytes(received) == pseudo_random(size)


def test_a_unix_target_path_that_is_not_utf8_relays(workdir: Path) -> None:
    """A path of any bytes is a path: it relays, and the process title and logs show
    it escaped (setproctitle(3) takes only UTF-8)."""
    path = os.fsencode(workdir) + b"/t\xff\x1b.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()

    def echo_once() -> None:
        connection, _ = server.accept()
        with connection:
            while data := connection.recv(65536):
                connection.sendall(data)

    echo = threading.Thread(target=echo_once, daemon=True)
    echo.start()
    target = os.fsdecode(path)  # as forkproxy's argv decodes it: surrogateescape
    with server, run_proxy(["-w", "1", "--log-level=debug", target], workdir) as proxy:
        with proxy.connect() as client:
            assert send_all_then_read(client, b"any bytes") == b"any bytes"
        title = Path(f"/proc/{proxy.pid}/cmdline").read_bytes()
        assert b"forkproxy: master " + os.fsencode(workdir) + b"/t\\xff\\x1b.sock" in title
    echo.join(10)
    assert "\x1b" not in proxy.stderr()
