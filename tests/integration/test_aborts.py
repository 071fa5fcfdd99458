"""Aborts are passed on as aborts, clean ends as clean ends, with real TCP sockets on both
sides of the real forkproxy: relayed by a worker, and by a one-shot forkproxy that
systemd gave the connection (Accept=yes, and --inetd).

A peer that resets (an RST) makes forkproxy close the other side with an RST too, so the
far peer reads ECONNRESET: truncation never looks like completion. A clean EOF is still
passed on as a FIN, after every byte.
"""

import contextlib
import hashlib
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.support.proxy import FORKPROXY, REPO, run_proxy, wait_until
from tests.support.scripted import (
    LINGER_RESET,
    ScriptedBackend,
    open_script,
    pattern,
    read_exactly,
    read_to_end,
)

SIZE = 256 << 10
MODES = ["worker", "accept", "inetd"]


class Relayed:
    """Client connections relayed to `backend` by forkproxy, as `mode` says: through a
    worker of one forkproxy, or each by its own one-shot forkproxy (Accept=yes with the
    connection as fd 3, or --inetd with it as standard input)."""

    def __init__(self, mode: str, backend: ScriptedBackend, workdir: Path) -> None:
        self.mode = mode
        self.backend = backend
        self.workdir = workdir
        self.instances: list[subprocess.Popen[bytes]] = []
        self.stack = contextlib.ExitStack()
        self.proxy = None
        if mode == "worker":
            self.proxy = self.stack.enter_context(
                run_proxy(["-w", "1", "--graceful-timeout=1s", backend.target], workdir)
            )

    def connect(self) -> socket.socket:
        if self.proxy is not None:
            return self.proxy.connect(timeout=30)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname(), timeout=30)
            connection, _ = listener.accept()
        args = ["--graceful-timeout=1s", self.backend.target]
        with connection:
            if self.mode == "accept":
                command = [sys.executable, "-m", "tests.support.activate"]
                command += [f"{connection.fileno()}:connection", "--", FORKPROXY, *args]
                process = subprocess.Popen(
                    command, cwd=REPO, pass_fds=[connection.fileno()], stderr=subprocess.PIPE
                )
            else:
                process = subprocess.Popen(
                    [FORKPROXY, "--inetd", *args], stdin=connection, stderr=subprocess.PIPE
                )
        self.instances.append(process)
        return client

    def stop(self) -> None:
        """SIGTERM to what relays (forkproxy, or the one-shot instances still running)."""
        if self.proxy is not None:
            self.proxy.signal(signal.SIGTERM)
        for process in self.instances:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def exit_statuses(self) -> list[int]:
        """Each one-shot instance's exit status, once it has exited by itself."""
        statuses = []
        for process in self.instances:
            _, stderr = process.communicate(timeout=15)
            assert b"Traceback" not in stderr, stderr.decode()
            statuses.append(process.returncode)
        return statuses

    def close(self) -> None:
        for process in self.instances:
            if process.poll() is None:
                process.kill()
            process.communicate()
        self.stack.close()


@pytest.fixture(params=MODES)
def relayed(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Relayed]:
    with ScriptedBackend() as backend:
        relayed = Relayed(request.param, backend, workdir)
        try:
            yield relayed
        finally:
            relayed.close()


def _ended(backend: ScriptedBackend, name: str) -> Callable[[], bool]:
    return partial(dict.__contains__, backend.ended, name)


def test_a_target_reset_reaches_the_client_as_a_reset(relayed: Relayed) -> None:
    backend = relayed.backend
    with relayed.connect() as client:
        open_script(client, "reset", "download", SIZE)
        assert read_exactly(client, SIZE) == pattern("download", SIZE)
        backend.release("download")  # the target resets: RST, mid-connection
        rest, how = read_to_end(client)
    assert (rest, how) == (b"", "reset")
    assert relayed.exit_statuses() == [0] * len(relayed.instances)


def test_a_client_reset_mid_upload_reaches_the_target_as_a_reset(relayed: Relayed) -> None:
    backend = relayed.backend
    with relayed.connect() as client:
        open_script(client, "sink", "upload", SIZE)
        client.sendall(pattern("upload", SIZE)[: SIZE // 2])  # half of the upload
        wait_until(lambda: backend.received.get("upload", 0) > 0, 10, "the upload to start")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    # closed with SO_LINGER 0: an RST to forkproxy, mid-upload
    wait_until(_ended(backend, "upload"), 10, "the target's end of the upload")
    assert backend.ended["upload"] == "reset"
    assert backend.received["upload"] <= SIZE // 2
    assert relayed.exit_statuses() == [0] * len(relayed.instances)


def test_clean_ends_stay_clean_with_every_byte(relayed: Relayed) -> None:
    backend = relayed.backend
    with relayed.connect() as client:  # the target closes: its FIN after the last byte
        open_script(client, "stream", "download", SIZE)
        assert read_exactly(client, SIZE // 2) == pattern("download", SIZE)[: SIZE // 2]
        backend.release("download")
        assert read_to_end(client) == (pattern("download", SIZE)[SIZE // 2 :], "eof")
    with relayed.connect() as client:  # the client closes: its FIN after the last byte
        open_script(client, "sink", "upload", SIZE)
        upload = pattern("upload", SIZE)
        client.sendall(upload)
        client.shutdown(socket.SHUT_WR)
        assert read_to_end(client) == (hashlib.sha256(upload).hexdigest().encode(), "eof")
    wait_until(_ended(backend, "upload"), 10, "the target's end of the upload")
    assert backend.ended["upload"] == "eof" and backend.received["upload"] == SIZE
    assert relayed.exit_statuses() == [0] * len(relayed.instances)


def test_the_graceful_timeout_aborts_what_it_cuts_short(relayed: Relayed) -> None:
    """--graceful-timeout=1s: a download still under way then is reset, not ended with a
    FIN that would pass for its end."""
    with relayed.connect() as client:
        open_script(client, "stream", "download", SIZE)
        assert read_exactly(client, SIZE // 2) == pattern("download", SIZE)[: SIZE // 2]
        relayed.stop()  # the target holds back the second half for longer than that
        assert read_to_end(client) == (b"", "reset")
    if relayed.proxy is not None:
        assert relayed.proxy.wait(15) == 0
    assert relayed.exit_statuses() == [0] * len(relayed.instances)
