"""Accept=yes and inetd: systemd accepts, forkproxy relays that one connection and exits 0."""

import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.proxy import (
    FORKPROXY,
    REPO,
    children_of,
    connect_when_listening,
    free_port,
    process_state,
    run_backend,
    send_all_then_read,
    wait_until,
)


@pytest.mark.parametrize("inetd", [False, True], ids=["accept", "accept-inetd"])
def test_each_client_gets_its_own_forkproxy_that_exits_0(workdir: Path, inetd: bool) -> None:
    port = free_port()
    modes = ["--accept", "--inetd"] if inetd else ["--accept"]
    extra = ["--inetd"] if inetd else []
    with run_backend("digest") as backend, open(workdir / "activate.log", "wb") as log:
        activator = subprocess.Popen(
            [
                "systemd-socket-activate",
                *modes,
                "-l",
                f"127.0.0.1:{port}",
                FORKPROXY,
                *extra,
                backend.target,
            ],
            stderr=log,
            start_new_session=True,
        )
        try:
            seen: set[int] = set()
            for index in range(3):
                request = os.urandom(10_000 + index)
                with connect_when_listening(port) as client:
                    # the instance serving this client: a child of the activator
                    wait_until(
                        lambda: set(children_of(activator.pid)) - seen,
                        10,
                        "a forkproxy instance for this connection",
                    )
                    (instance,) = set(children_of(activator.pid)) - seen
                    seen.add(instance)
                    reply = send_all_then_read(client, request)
                assert reply.decode().split() == [
                    hashlib.sha256(request).hexdigest(),
                    str(len(request)),
                ]
                wait_until(
                    lambda pid=instance: process_state(pid) in ("", "Z"), 10, "the instance to exit"
                )
            assert len(seen) == 3
        finally:
            os.killpg(activator.pid, signal.SIGKILL)
            activator.wait()
    log_text = (workdir / "activate.log").read_text()
    assert "Traceback" not in log_text
    # systemd-socket-activate reports children that fail; none did.
    assert "failed" not in log_text.lower()


def _accept_instance(connection: socket.socket, *args: str) -> subprocess.Popen[bytes]:
    """forkproxy as an Accept=yes instance: `connection` passed as fd 3, as systemd does.
    Closes our copy of `connection`, so the instance holds the only one."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.activate",
            f"{connection.fileno()}:connection",
            "--",
            FORKPROXY,
            *args,
        ],
        cwd=REPO,
        pass_fds=[connection.fileno()],
        stderr=subprocess.PIPE,
    )
    connection.close()
    return process


def test_accept_instance_exit_status_is_0(workdir: Path) -> None:
    """Run one Accept=yes instance directly with the connection as fd 3 and read its status."""
    with run_backend("echo") as backend:
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        connection, _ = listener.accept()
        process = _accept_instance(connection, backend.target)
        assert send_all_then_read(client, b"one connection") == b"one connection"
        client.close()
        _, stderr = process.communicate(timeout=10)
        listener.close()
    assert process.returncode == 0, stderr
    assert stderr == b""


def test_inetd_with_a_non_socket_stdin_is_one_line_error() -> None:
    result = subprocess.run(
        [FORKPROXY, "--inetd", "127.0.0.1:9"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 1
    assert (
        result.stderr
        == "forkproxy: standard input (--inetd) is not a socket: Socket operation on non-socket\n"
    )


def test_inetd_with_a_listener_on_stdin_serves_as_usual(workdir: Path) -> None:
    """inetd "wait" style (Accept=no, StandardInput=socket): the listener is stdin."""
    port = free_port()
    with run_backend("echo") as backend, open(workdir / "activate.log", "wb") as log:
        activator = subprocess.Popen(
            [
                "systemd-socket-activate",
                "--inetd",
                "-l",
                f"127.0.0.1:{port}",
                FORKPROXY,
                "--inetd",
                "-w",
                "2",
                backend.target,
            ],
            stderr=log,
            start_new_session=True,
        )
        try:
            for index in range(3):
                with connect_when_listening(port) as client:
                    assert send_all_then_read(client, b"n%d" % index) == b"n%d" % index
            wait_until(lambda: len(children_of(activator.pid)) == 2, 10, "two workers")
            activator.send_signal(signal.SIGTERM)
            assert activator.wait(15) == 0
        finally:
            if activator.poll() is None:
                os.killpg(activator.pid, signal.SIGKILL)
            activator.wait()


def test_accept_instance_uses_the_relay_options(workdir: Path) -> None:
    """Accept=yes honours --proxy-protocol and several targets (the first one down)."""
    down = free_port()  # nothing listens there
    with run_backend("digest") as backend:
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        connection, _ = listener.accept()
        process = _accept_instance(
            connection, "--proxy-protocol=v1", f"127.0.0.1:{down}", backend.target
        )
        reply = send_all_then_read(client, b"hello")
        client_ip, client_port = client.getsockname()
        proxy_ip, proxy_port = listener.getsockname()
        client.close()
        _, stderr = process.communicate(timeout=10)
        listener.close()
    header = f"PROXY TCP4 {client_ip} {proxy_ip} {client_port} {proxy_port}\r\n".encode()
    assert reply.decode().split() == [
        hashlib.sha256(header + b"hello").hexdigest(),
        str(len(header) + 5),
    ]
    assert process.returncode == 0, stderr
