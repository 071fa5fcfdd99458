"""--access-log with the installed forkproxy, real clients and targets: every `end=` a test
can cause, exact byte counts, rotation by rename and SIGUSR1 across 4 workers, a path that
cannot be opened, and lines a full disk drops (counted)."""

import contextlib
import os
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import test_relay_features
from tests.support.access_log import read_log, wait_for_lines
from tests.support.proxy import (
    Proxy,
    run_backend,
    run_cli,
    run_proxy,
    send_all_then_read,
    wait_until,
)
from tests.support.supervision import get

never_accepting = test_relay_features.never_accepting  # the fixture, used by name below
NAMES = ("web",)
METRICS = (("tcp", "tcp"), ("web", "metrics"))


def one_line(path: Path) -> dict[str, object]:
    (line,) = wait_for_lines(path, 1)
    assert line["listener"] == "web"
    return line


def _local(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


@contextlib.contextmanager
def resetting_target() -> Iterator[str]:
    """A target that reads one byte, answers one, then resets the connection (SO_LINGER
    0): once the first byte came through, the connection is relayed for sure."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(1)
            conn.sendall(b"x")
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.close()
        thread.join(5)


def _proxy(
    workdir: Path, log: Path, *args: str, json_format: bool = True
) -> "contextlib.AbstractContextManager[Proxy]":
    fmt = ["--access-log-format=json"] if json_format else []
    return run_proxy(["-w", "2", f"--access-log={log}", *fmt, *args], workdir, names=NAMES)


@pytest.mark.parametrize("json_format", [False, True], ids=["logfmt", "json"])
def test_client_closed_with_exact_byte_counts(workdir: Path, json_format: bool) -> None:
    log = workdir / "access.log"
    payload = os.urandom(3 << 20)
    with (
        run_backend("echo") as backend,
        _proxy(workdir, log, backend.target, json_format=json_format) as proxy,
    ):
        with proxy.connect() as client:
            client_address = _local(client)
            assert send_all_then_read(client, payload) == payload
        line = one_line(log)
    assert line["end"] == "client-closed"
    assert line["client"] == client_address
    assert line["target"] == backend.target
    assert int(str(line["bytes_from_client"])) == len(payload)
    assert int(str(line["bytes_to_client"])) == len(payload)
    assert line["worker"] in (0, 1, "0", "1")
    assert float(str(line["connect_ms"])) >= 0
    assert float(str(line["duration_ms"])) >= float(str(line["connect_ms"]))
    assert str(line["time"]).endswith("Z")


def test_target_closed(workdir: Path) -> None:
    log = workdir / "access.log"
    with run_backend("source:100000") as backend, _proxy(workdir, log, backend.target) as proxy:
        with proxy.connect() as client:
            assert len(send_all_then_read(client, b"", half_close=False)) == 100000
        line = one_line(log)
    assert (line["end"], line["bytes_to_client"], line["bytes_from_client"]) == (
        "target-closed",
        100000,
        0,
    )


def test_client_reset(workdir: Path) -> None:
    log = workdir / "access.log"
    with run_backend("greet") as backend, _proxy(workdir, log, backend.target) as proxy:
        with proxy.connect() as client:
            assert client.recv(1) == b"+"
            client.sendall(b"abc")
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        line = one_line(log)
    assert (line["end"], line["bytes_to_client"]) == ("client-reset", 1)


def test_target_reset(workdir: Path) -> None:
    log = workdir / "access.log"
    with resetting_target() as target, _proxy(workdir, log, target) as proxy:
        with proxy.connect() as client, contextlib.suppress(ConnectionResetError):
            client.sendall(b"a")
            while client.recv(100):
                pass
        line = one_line(log)
    assert (line["end"], line["bytes_from_client"], line["bytes_to_client"]) == (
        "target-reset",
        1,
        1,
    )


def test_idle_timeout(workdir: Path) -> None:
    log = workdir / "access.log"
    with (
        run_backend("greet") as backend,
        _proxy(workdir, log, "--idle-timeout=0.3s", backend.target) as proxy,
    ):
        with proxy.connect() as client, contextlib.suppress(ConnectionResetError):
            assert client.recv(1) == b"+"
            assert client.recv(1) == b""
        line = one_line(log)
    assert (line["end"], line["bytes_to_client"]) == ("idle-timeout", 1)


def test_connect_timeout(workdir: Path, never_accepting: str) -> None:
    log = workdir / "access.log"
    with _proxy(workdir, log, "--connect-timeout=0.3s", never_accepting) as proxy:
        with proxy.connect() as client:
            assert client.recv(1) == b""
        line = one_line(log)
    assert (line["end"], line["connect_ms"], line["target"]) == ("connect-timeout", None, "")


def test_connect_failed(workdir: Path) -> None:
    log = workdir / "access.log"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
        target = f"127.0.0.1:{closed.getsockname()[1]}"
        with _proxy(workdir, log, target) as proxy:
            with proxy.connect() as client:
                assert client.recv(1) == b""
            line = one_line(log)
    assert (line["end"], line["bytes_from_client"]) == ("connect-failed", 0)


def test_no_target(workdir: Path) -> None:
    log = workdir / "access.log"
    with _proxy(workdir, log, "no-such-host.invalid:80") as proxy:
        with proxy.connect() as client, contextlib.suppress(ConnectionResetError):
            assert client.recv(1) == b""
        line = one_line(log)
    assert line["end"] == "no-target"


@pytest.mark.parametrize(
    ("option", "end"),
    [
        ("--connections-max=1", "refused-cap"),
        ("--connections-max-per-source=1", "refused-per-source"),
    ],
)
def test_refused(workdir: Path, option: str, end: str) -> None:
    log = workdir / "access.log"
    with (
        run_backend("greet") as backend,
        _proxy(workdir, log, option, backend.target) as proxy,
        proxy.connect() as held,
    ):
        assert held.recv(1) == b"+"
        with proxy.connect() as refused, contextlib.suppress(ConnectionResetError):
            assert refused.recv(1) == b""
            refused_address = _local(refused)
        line = one_line(log)
    assert (line["end"], line["client"], line["connect_ms"]) == (end, refused_address, None)


def test_stopped_at_the_graceful_timeout(workdir: Path) -> None:
    log = workdir / "access.log"
    with (
        run_backend("echo") as backend,
        _proxy(workdir, log, "--graceful-timeout=0.3s", backend.target) as proxy,
        proxy.connect() as client,
    ):
        client.sendall(b"12345")
        assert client.recv(5) == b"12345"  # relayed both ways: counted
        assert proxy.stop() == 0
        line = one_line(log)
    assert (line["end"], line["bytes_from_client"], line["bytes_to_client"]) == ("stopped", 5, 5)


def test_rotation_loses_no_line(workdir: Path) -> None:
    """N connections give N lines across the renamed file and the new one, with 4 workers
    reopening at their own pace."""
    log = workdir / "access.log"
    rotated = workdir / "access.log.1"
    with (
        run_backend("echo") as backend,
        run_proxy(
            ["-w", "4", f"--access-log={log}", backend.target], workdir, names=NAMES
        ) as proxy,
    ):
        count = 0

        def one() -> None:
            nonlocal count
            with proxy.connect() as client:
                assert send_all_then_read(client, b"ping") == b"ping"
            count += 1

        for _ in range(100):
            one()
        os.rename(log, rotated)
        proxy.signal(signal.SIGUSR1)
        for _ in range(100):
            one()
        # Until a worker that reopened has served one (each does so at its own pace).
        for _ in range(1000):
            if read_log(log):
                break
            one()
        wait_until(lambda: len(read_log(log)) + len(read_log(rotated)) >= count, 15, "lines")
        assert len(read_log(log)) + len(read_log(rotated)) == count
        assert read_log(log), "no worker reopened the log"
        assert "SIGUSR1: reopening the access log files" in proxy.stderr()
        clients = [line["client"] for line in read_log(log) + read_log(rotated)]
        assert len(set(clients)) == count


def test_reopen_to_a_path_that_cannot_be_opened_keeps_the_old_file(workdir: Path) -> None:
    directory = workdir / "logs"
    directory.mkdir()
    log = directory / "access.log"
    with run_backend("echo") as backend, _proxy(workdir, log, backend.target) as proxy:
        directory.rename(workdir / "gone")
        proxy.signal(signal.SIGUSR1)
        wait_until(lambda: "SIGUSR1: cannot open access log" in proxy.stderr(), 10, "the error")
        with proxy.connect() as client:
            assert send_all_then_read(client, b"still") == b"still"
        one_line(workdir / "gone" / "access.log")
        assert proxy.process.poll() is None


@pytest.mark.parametrize("kind", ["missing directory", "a directory"])
def test_a_path_that_cannot_be_opened_is_an_error_at_start(workdir: Path, kind: str) -> None:
    path = str(workdir / "missing" / "access.log") if kind == "missing directory" else str(workdir)
    listen = f"--listen={workdir / 'proxy.sock'}"
    result = run_cli([listen, f"--access-log={path}", "127.0.0.1:9"])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"forkproxy: cannot open access log '{path}': ")
    assert "Traceback" not in result.stderr


def test_a_full_disk_drops_lines_and_counts_them(workdir: Path) -> None:
    with (
        run_backend("echo") as backend,
        run_proxy(
            ["-w", "1", "--access-log=/dev/full", backend.target], workdir, *METRICS
        ) as proxy,
    ):
        for _ in range(3):
            with proxy.connect() as client:
                assert send_all_then_read(client, b"x") == b"x"
        wait_until(lambda: _dropped(proxy) == 3, 10, "3 dropped lines")


def _dropped(proxy: Proxy) -> float:
    status, body = get(proxy, "/metrics")
    assert status == 200
    for line in body.splitlines():
        if line.startswith("forkproxy_access_log_dropped_total "):
            return float(line.split()[1])
    raise AssertionError("no forkproxy_access_log_dropped_total")


def test_standard_error(workdir: Path) -> None:
    with (
        run_backend("echo") as backend,
        run_proxy(["-w", "1", "--access-log=-", backend.target], workdir, names=NAMES) as proxy,
    ):
        with proxy.connect() as client:
            assert send_all_then_read(client, b"hi") == b"hi"
        wait_until(lambda: "end=client-closed" in proxy.stderr(), 10, "the line")
        (line,) = [one for one in proxy.stderr().splitlines() if "end=" in one]
        assert line.startswith("time=") and "bytes_from_client=2 bytes_to_client=2" in line
