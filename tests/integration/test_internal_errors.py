"""A connection whose own handling fails, whatever Python raises, ends alone: its client is
closed at once, what it held (admission, both sockets, pipes) comes back, one warning is
logged, and the worker and its other connections go on.

Two ways in: a target whose connect() raises something other than an errno (a scoped IPv6
address naming no interface: `socket.gaierror`), and exceptions injected into a
connection's callbacks with FORKPROXY_FAILPOINT (tests only: forkproxy/relay/failpoints.py).
"""

import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procfs import fd_kinds
from tests.support.proxy import FORKPROXY, REPO, Proxy, run_backend, run_proxy, wait_until
from tests.support.scripted import read_to_end

NO_SUCH_INTERFACE = "[fe80::1%fpnosuch0]:80"  # no interface is named so: connect() raises


def _echo(client: socket.socket, data: bytes) -> bytes:
    client.sendall(data)
    return client.recv(len(data), socket.MSG_WAITALL)


def _closed_at_once(client: socket.socket) -> bool:
    """The proxy closed `client` (EOF or reset) without relaying a byte."""
    readable, _, _ = select.select([client], [], [], 10)
    return bool(readable) and read_to_end(client)[0] == b""


def _cut_off(proxy: Proxy) -> bool:
    """Connect and send, and find the connection closed without a byte relayed. Its reset
    may come early enough for connect() itself to report it."""
    listener = proxy.listeners[0]
    with socket.socket(listener.family, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        try:
            client.connect(listener.getsockname())
            client.sendall(b"victim")
        except (BrokenPipeError, ConnectionResetError):
            return True
        return _closed_at_once(client)


def _warnings(proxy: Proxy, text: str) -> list[str]:
    return [line for line in proxy.stderr().splitlines() if text in line]


def _sockets(pid: int) -> int:
    return fd_kinds(pid)["socket"]


# -- a scoped IPv6 target without its interface ----------------------------------------------


def test_a_scoped_target_without_its_interface_fails_the_connect_and_frees_the_cap(
    workdir: Path,
) -> None:
    """With -c 1 in queue mode, a client whose admission were kept would wait for ever: each
    one is closed at once instead, the unit back for the next."""
    with run_proxy(["-w", "1", "-c", "1", "--on-limit=queue", NO_SUCH_INTERFACE], workdir) as proxy:
        (worker,) = proxy.workers()
        for _ in range(3):
            with proxy.connect() as client:
                assert _closed_at_once(client)
        wait_until(lambda: _warnings(proxy, "cannot connect"), 10, "the warning")
        (line,) = _warnings(proxy, "cannot connect")
        assert f"'{NO_SUCH_INTERFACE}'" in line
        assert "no network interface 'fpnosuch0' for 'fe80::1%fpnosuch0'" in line
        assert "Traceback" not in proxy.stderr()
        assert proxy.workers() == [worker]
        assert proxy.stop() == 0  # nothing left to drain


def test_a_scoped_target_without_its_interface_fails_over_to_the_next(workdir: Path) -> None:
    with (
        run_backend("echo") as backend,
        run_proxy(["-w", "1", "-c", "1", NO_SUCH_INTERFACE, backend.target], workdir) as proxy,
    ):
        for index in range(4):  # round-robin starts with either: both orders are met
            with proxy.connect() as client:
                assert _echo(client, b"hello %d" % index) == b"hello %d" % index
                # Both EOFs passed on: the relay is gone and its unit back (-c 1) before
                # the worker can take the next client.
                client.shutdown(socket.SHUT_WR)
                assert read_to_end(client) == (b"", "eof")
        assert "no network interface 'fpnosuch0'" in proxy.stderr()
        assert "Traceback" not in proxy.stderr()


@pytest.mark.parametrize("second_target", [False, True], ids=["alone", "then-a-good-one"])
def test_accept_instance_with_a_scoped_target_without_its_interface(
    workdir: Path, second_target: bool
) -> None:
    with run_backend("echo") as backend, socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        connection, _ = listener.accept()
        targets = [NO_SUCH_INTERFACE, backend.target] if second_target else [NO_SUCH_INTERFACE]
        with connection:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.activate"]
                + [f"{connection.fileno()}:connection", "--", FORKPROXY, *targets],
                cwd=REPO,
                pass_fds=[connection.fileno()],
                stderr=subprocess.PIPE,
            )
        with client:
            if second_target:
                assert _echo(client, b"served") == b"served"
                client.shutdown(socket.SHUT_WR)
                assert read_to_end(client) == (b"", "eof")
            else:
                assert _closed_at_once(client)
        _, stderr = process.communicate(timeout=10)
    text = stderr.decode()
    assert "Traceback" not in text
    if second_target:
        assert process.returncode == 0, text
    else:
        assert process.returncode == 1
        assert "no network interface 'fpnosuch0'" in text and len(text.splitlines()) == 1


# -- exceptions injected into a connection's callbacks ----------------------------------------


@pytest.mark.parametrize(
    ("stage", "hostname"),
    [
        ("accept", False),  # in the accept batch, before the connector has the client
        ("connected", False),  # in the connect callback, inside the accept batch
        ("connected", True),  # in the connect callback, from the resolver's task
        ("readable", False),  # in the relay's readable callback, from the poller
    ],
    ids=["accept", "connected", "connected-resolved", "readable"],
)
@pytest.mark.parametrize(
    "per_source", ["", "global", "listener"], ids=["cap", "cap-and-per-source", "listener"]
)
def test_an_exception_in_a_callback_releases_that_connection_only(
    workdir: Path, stage: str, hostname: bool, per_source: str
) -> None:
    """With a per-source limit of 2 too (global, or the listener's own from a
    configuration file), the victim's one admission holds a row of the per-source table:
    the third client, from the same address, needs that back as well."""
    limits = ["-c", "2"] + (["--max-connections-per-source=2"] if per_source == "global" else [])
    with run_backend("echo") as backend:
        target = f"localhost:{backend.port}" if hostname else backend.target
        names: tuple[str, ...] = ()
        if per_source == "listener":
            if sys.version_info < (3, 11):
                pytest.skip("--config needs tomllib")
            config = workdir / "forkproxy.toml"
            config.write_text(
                f'[listeners.web]\ntargets = ["{target}"]\nconnections-max-per-source = 2\n'
            )
            limits += ["--config", str(config)]
            names = ("web",)
        with run_proxy(
            ["-w", "1", *limits] + ([] if names else [target]),
            workdir,
            names=names,
            env={"FORKPROXY_FAILPOINT": f"{stage}:2"},
        ) as proxy:
            (worker,) = proxy.workers()
            idle_sockets = _sockets(worker)
            with proxy.connect() as first:
                assert _echo(first, b"first") == b"first"
                assert _cut_off(proxy)  # the second connection: it fails
                # -c 2 with `first` open: a third is served only if the victim's admission
                # is back.
                with proxy.connect() as third:
                    assert _echo(third, b"third") == b"third"
                assert _echo(first, b"still here") == b"still here"
            wait_until(lambda: _sockets(worker) == idle_sockets, 10, "every socket closed")
            (line,) = _warnings(proxy, "internal error")
            assert "InjectedFault" in line and "closing connection" in line
            assert "Traceback" not in proxy.stderr()
            assert proxy.workers() == [worker]  # the same worker, still serving
            assert proxy.stop() == 0


def test_an_exception_in_an_accept_instance_aborts_its_connection_and_exits_1(
    workdir: Path,
) -> None:
    with run_backend("echo") as backend, socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        connection, _ = listener.accept()
        with connection:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.activate"]
                + [f"{connection.fileno()}:connection", "--", FORKPROXY, backend.target],
                cwd=REPO,
                pass_fds=[connection.fileno()],
                stderr=subprocess.PIPE,
                env={**os.environ, "FORKPROXY_FAILPOINT": "readable:1"},
            )
        with client:
            client.sendall(b"boom")
            assert read_to_end(client) == (b"", "reset")
        _, stderr = process.communicate(timeout=10)
    lines = stderr.decode().splitlines()
    assert process.returncode == 1
    assert len(lines) == 1 and "internal error" in lines[0] and "InjectedFault" in lines[0]
