"""Start, readiness, process titles, graceful stop, and the ways users launch forkproxy."""

import datetime
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.backend import pseudo_random
from tests.support.proxy import (
    FORKPROXY,
    Notifications,
    children_of,
    connect_when_listening,
    free_port,
    run_backend,
    run_proxy,
    send_all_then_read,
    wait_until,
)


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().replace(b"\0", b" ").decode().strip()


def test_ready_stopping_and_exit_0(workdir: Path) -> None:
    with run_backend("echo") as backend, run_proxy(["-w", "2", backend.target], workdir) as proxy:
        assert "READY=1" in proxy.notifications.lines()
        assert proxy.stop() == 0
        assert "STOPPING=1" in proxy.notifications.lines()


def test_titles_and_exactly_the_asked_number_of_workers(workdir: Path) -> None:
    with run_backend("echo") as backend, run_proxy(["-w", "3", backend.target], workdir) as proxy:
        workers = proxy.workers()
        assert len(workers) == 3
        assert _cmdline(proxy.pid).startswith("forkproxy: master")
        titles = sorted(_cmdline(pid) for pid in workers)
        assert titles == ["forkproxy: worker 0", "forkproxy: worker 1", "forkproxy: worker 2"]
        ps = subprocess.run(
            ["ps", "-o", "args=", "-p", str(workers[0])], capture_output=True, text=True, check=True
        )
        assert ps.stdout.startswith("forkproxy: worker")


def test_sigterm_lets_a_transfer_finish_then_exits_0(workdir: Path) -> None:
    size = 64 << 20
    with (
        run_backend(f"source:{size}") as backend,
        run_proxy(["-w", "1", backend.target], workdir) as proxy,
    ):
        with proxy.connect(timeout=60) as client:
            first = client.recv(65536)  # the transfer is under way ...
            assert first
            proxy.signal(signal.SIGTERM)  # ... when the stop is asked for
            received = bytearray(first)
            while chunk := client.recv(1 << 20):
                received += chunk
                time.sleep(0.001)  # a slow reader: the stop must wait for it
        assert bytes(received) == pseudo_random(size)
        assert proxy.wait(30) == 0
        assert "STOPPING=1" in proxy.notifications.lines()


def test_no_new_connections_after_sigterm(workdir: Path) -> None:
    with run_backend("echo") as backend, run_proxy(["-w", "2", backend.target], workdir) as proxy:
        held = proxy.connect()
        held.sendall(b"ping")
        assert held.recv(4) == b"ping"
        proxy.signal(signal.SIGTERM)
        proxy.notifications.wait_for("STOPPING=1")
        wait_until(lambda: _refused(proxy), 10, "the listener to stop accepting")
        held.sendall(b"pong")  # the open connection still works while draining
        assert held.recv(4) == b"pong"
        held.close()
        assert proxy.wait(15) == 0


def test_a_target_with_nothing_listening_closes_the_client_and_recovers(workdir: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on port now
    with run_proxy(["-w", "2", f"127.0.0.1:{port}"], workdir) as proxy:
        for _ in range(3):
            with proxy.connect() as client:
                assert client.recv(1) == b""  # closed promptly, not left hanging
        assert "cannot connect to target" in proxy.stderr()
        assert proxy.process.poll() is None
        with run_backend("echo", f"tcp:127.0.0.1:{port}"), proxy.connect() as client:
            assert send_all_then_read(client, b"back again") == b"back again"


def test_listen_option_binds_and_relays(workdir: Path) -> None:
    path = workdir / "front.sock"
    port = free_port()
    notify = Notifications(workdir)
    with run_backend("echo") as backend:
        process = subprocess.Popen(
            [
                FORKPROXY,
                "-w",
                "2",
                "--listen",
                str(path),
                "--listen",
                f"127.0.0.1:{port}",
                backend.target,
            ],
            env={**os.environ, "NOTIFY_SOCKET": notify.path},
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            notify.wait_for("READY=1")
            assert oct(path.stat().st_mode & 0o777) == oct(0o666)
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
                assert send_all_then_read(client, b"via --listen") == b"via --listen"
            with socket.create_connection(("127.0.0.1", port)) as client:
                assert send_all_then_read(client, b"via tcp") == b"via tcp"
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
            assert not path.exists()  # it created the file, so it removes it
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            notify.close()


def test_listen_mode_refuses_new_clients_at_once_while_draining(workdir: Path) -> None:
    """Sockets forkproxy bound itself are closed (and unlinked) when the stop begins, so a
    new client is refused instead of waiting in a backlog until the graceful timeout."""
    path = workdir / "front.sock"
    port = free_port()
    notify = Notifications(workdir)
    with run_backend("echo") as backend:
        process = subprocess.Popen(
            [
                *(FORKPROXY, "-w", "2", "--graceful-timeout=60s"),
                *("--listen", str(path), "--listen", f"127.0.0.1:{port}", backend.target),
            ],
            env={**os.environ, "NOTIFY_SOCKET": notify.path},
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            notify.wait_for("READY=1")
            held = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.sendall(b"ping")
            assert held.recv(4) == b"ping"
            process.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING=1")
            wait_until(lambda: _tcp_refused(port), 10, "new TCP clients to be refused")
            assert not path.exists()
            with socket.socket(socket.AF_UNIX) as client, pytest.raises(FileNotFoundError):
                client.connect(str(path))
            held.sendall(b"pong")  # the open connection still works while draining
            assert held.recv(4) == b"pong"
            assert process.poll() is None  # draining: it waits for the held connection
            held.close()
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            notify.close()


def _tcp_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
            probe.sendall(b"?")
            probe.recv(1)  # a backlog nobody accepts from: times out; a reset: refused
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except TimeoutError:
        return False
    return False


def _refused(proxy) -> bool:
    """True once a new connection is no longer relayed (left in the backlog unanswered)."""
    with proxy.connect(timeout=0.5) as probe:
        probe.sendall(b"?")
        try:
            return probe.recv(1) != b"?"
        except TimeoutError:
            return True


@pytest.mark.parametrize("listener_count", [1, 2])
def test_under_systemd_socket_activate(workdir: Path, listener_count: int) -> None:
    ports = [free_port() for _ in range(listener_count)]
    with run_backend("echo") as backend:
        command = ["systemd-socket-activate"]
        for port in ports:
            command += ["-l", f"127.0.0.1:{port}"]
        with open(workdir / "activate.log", "wb") as log:
            process = subprocess.Popen(
                [*command, FORKPROXY, "-w", "2", backend.target],
                stderr=log,
                start_new_session=True,
            )
        try:
            for port in ports:
                with connect_when_listening(port) as client:
                    assert send_all_then_read(client, b"port %d" % port) == b"port %d" % port
            wait_until(lambda: len(children_of(process.pid)) == 2, 10, "two workers")
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_worker_killed_is_replaced(workdir: Path) -> None:
    with run_backend("echo") as backend, run_proxy(["-w", "2", backend.target], workdir) as proxy:
        victim = proxy.workers()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: victim not in proxy.workers() and len(proxy.workers()) == 2,
            10,
            "a replacement worker",
        )
        with proxy.connect() as client:
            assert send_all_then_read(client, b"still serving") == b"still serving"


def test_ctrl_c_stops_gracefully(workdir: Path) -> None:
    with run_backend("echo") as backend, run_proxy(["-w", "2", backend.target], workdir) as proxy:
        os.killpg(proxy.pid, signal.SIGINT)  # what a terminal does: the whole group
        assert proxy.wait(15) == 0


def test_connections_in_flight_survive_a_concurrent_stop(workdir: Path) -> None:
    with run_backend("echo") as backend, run_proxy(["-w", "2", backend.target], workdir) as proxy:
        clients = [proxy.connect() for _ in range(10)]
        for client in clients:
            client.sendall(b"a")
            assert client.recv(1) == b"a"
        proxy.signal(signal.SIGTERM)
        results = []
        threads = [
            threading.Thread(target=lambda c=c: results.append(send_all_then_read(c, b"bcd")))
            for c in clients
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for client in clients:
            client.close()
        assert results == [b"bcd"] * 10
        assert proxy.wait(15) == 0


def test_sigterm_while_workers_start_is_not_lost(workdir: Path) -> None:
    """A stop asked for while workers are still starting stops them all (regression)."""
    with run_backend("echo") as backend:
        for _ in range(5):
            with run_proxy(["-w", "2", backend.target], workdir, wait_ready=False) as proxy:
                wait_until(lambda: len(proxy.workers()) == 2, 10, "two workers forked")
                proxy.signal(signal.SIGTERM)
                assert proxy.wait(10) == 0


def test_journald_lines_carry_priorities_and_no_timestamps(workdir: Path) -> None:
    """Under journald ($JOURNAL_STREAM names stderr) lines start with sd-daemon(3) <N>."""
    stderr_path = workdir / "journal.log"
    stderr_path.touch()
    st = os.stat(stderr_path)
    with run_proxy(
        ["-w", "1", "127.0.0.1:9"],
        workdir,
        env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        stderr_path=stderr_path,
    ) as proxy:
        with proxy.connect() as client:
            assert client.recv(1) == b""  # nothing listens on the target: a warning
        wait_until(lambda: "cannot connect" in proxy.stderr(), 10, "the warning")
        assert proxy.stop() == 0
    lines = proxy.stderr().splitlines()
    assert lines and all(line[:3] in ("<6>", "<4>", "<3>", "<7>") for line in lines), lines
    assert any(line.startswith("<6>ready: ") for line in lines)
    assert any(line.startswith("<4>worker 0: cannot connect to target") for line in lines)


TERMINAL_LINE = re.compile(
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (DEBUG|INFO|NOTICE|WARNING|ERROR) "
)


def test_terminal_lines_carry_the_date_and_time_in_utc_and_the_level(workdir: Path) -> None:
    """Not under journald, every line, the master's and the workers', starts with ISO 8601
    in UTC with milliseconds: a log kept over days can be read without guessing the day."""
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    with run_proxy(["-w", "1", "127.0.0.1:9"], workdir) as proxy:
        with proxy.connect() as client:
            assert client.recv(1) == b""  # nothing listens on the target: a worker's warning
        wait_until(lambda: "cannot connect" in proxy.stderr(), 10, "the warning")
        assert proxy.stop() == 0
    stopped = datetime.datetime.now(datetime.timezone.utc)
    lines = proxy.stderr().splitlines()
    assert any(" WARNING worker 0: cannot connect to target" in line for line in lines), lines
    for line in lines:
        match = TERMINAL_LINE.match(line)
        assert match is not None, line
        moment = datetime.datetime.fromisoformat(match[1]).replace(tzinfo=datetime.timezone.utc)
        assert started <= moment <= stopped, line
