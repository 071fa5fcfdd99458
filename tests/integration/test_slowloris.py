"""Slow clients (slowloris): 1,000 clients trickling a byte a second neither
starve the others nor, with --idle-timeout, hold the connection cap for ever."""

import contextlib
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.proxy import REPO, Proxy, free_port, run_proxy, wait_until

SLOW_CLIENTS = 1_000
TRICKLE_INTERVAL = 1.0  # a byte a second
FD_NEEDED = 2 * SLOW_CLIENTS + 256  # this process: the slow clients, the normal ones, slack


@pytest.fixture(autouse=True)
def enough_descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FD_NEEDED:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {FD_NEEDED}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FD_NEEDED), hard))


@contextlib.contextmanager
def echo_backend() -> Iterator[str]:
    """bench.echo_server: one epoll loop, made for thousands of connections."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.echo_server", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


class SlowClients:
    """Connections that each send one byte per round and read its echo, in one epoll loop."""

    def __init__(self, proxy: Proxy, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.sent: dict[socket.socket, int] = {}
        self.echoed: dict[socket.socket, int] = {}
        self.closed: set[socket.socket] = set()
        for start in range(0, count, 100):  # in batches: the listen backlog stays short
            batch = []
            for _ in range(min(100, count - start)):
                client = proxy.connect()
                client.setblocking(False)
                self.selector.register(client, selectors.EVENT_READ)
                self.sent[client] = self.echoed[client] = 0
                batch.append(client)
            self.trickle(batch)
            self.pump_until(lambda: all(self.echoed[c] == self.sent[c] for c in self.open()))

    def open(self) -> list[socket.socket]:
        return [client for client in self.sent if client not in self.closed]

    def trickle(self, clients: list[socket.socket] | None = None) -> None:
        """One byte on every open connection (or on `clients`)."""
        for client in self.open() if clients is None else clients:
            try:
                client.send(b".")
            except OSError:  # closed by the proxy since the last look
                self.selector.unregister(client)
                self.closed.add(client)
                continue
            self.sent[client] += 1

    def pump(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            client = key.fileobj
            assert isinstance(client, socket.socket)
            try:
                data = client.recv(4096)
            except ConnectionResetError:
                data = b""
            if data:
                self.echoed[client] += len(data)
            else:
                self.selector.unregister(client)
                self.closed.add(client)

    def pump_until(self, condition: Callable[[], object], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "slow clients: timed out"
            self.pump(0.1)

    def trickle_for(self, rounds: int) -> None:
        """`rounds` more bytes on each, one every TRICKLE_INTERVAL (the pace is the test)."""
        next_round = time.monotonic()
        for _ in range(rounds):
            self.trickle()
            next_round += TRICKLE_INTERVAL
            while (remaining := next_round - time.monotonic()) > 0:
                self.pump(remaining)

    def close(self) -> None:
        for client in self.sent:
            client.close()
        self.selector.close()


class NormalLoad:
    """Threads doing request / whole reply / close in a loop, every byte checked."""

    def __init__(self, proxy: Proxy, threads: int = 10) -> None:
        self.proxy = proxy
        self.stop = threading.Event()
        self.done = [0] * threads
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, index: int) -> None:
        while not self.stop.is_set():
            payload = b"request %d/%d " % (index, self.done[index]) * 20
            try:
                with self.proxy.connect(timeout=10) as client:
                    client.sendall(payload)
                    client.shutdown(socket.SHUT_WR)
                    reply = b""
                    while chunk := client.recv(65536):
                        reply += chunk
                if reply != payload:
                    raise AssertionError(f"sent {len(payload)} bytes, got {len(reply)} back")
                self.done[index] += 1
            except (OSError, AssertionError) as error:
                self.failures.append(repr(error))
                return

    def __enter__(self) -> "NormalLoad":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def test_a_thousand_slow_clients_do_not_starve_the_others(workdir: Path) -> None:
    """Within the cap (1,000 slow + 10 normal < 1,100) the normal clients are served all
    along, and the slow ones, never silent for --idle-timeout, are not cut off."""
    with (
        echo_backend() as target,
        run_proxy(["-w", "2", "-c", "1100", "--idle-timeout", "5s", target], workdir) as proxy,
    ):
        slow = SlowClients(proxy, SLOW_CLIENTS)
        try:
            with NormalLoad(proxy) as load:
                slow.trickle_for(3)
            assert load.failures == []
            assert min(load.done) >= 1, load.done
            slow.pump_until(lambda: all(slow.echoed[c] == slow.sent[c] for c in slow.open()))
            assert slow.closed == set()  # each sent a byte every second: none idle
            assert all(count == 4 for count in slow.echoed.values())  # 1 at start, 3 rounds
        finally:
            slow.close()


def test_idle_timeout_takes_the_cap_back_from_slow_clients(workdir: Path) -> None:
    """With --idle-timeout below their pace (500ms), 1,000 clients sending a byte a second
    are each closed at their first pause: they cannot keep the cap's (1,000) places, and
    the normal clients are served."""
    with (
        echo_backend() as target,
        run_proxy(
            ["-w", "2", "-c", str(SLOW_CLIENTS), "--idle-timeout", "500ms", target], workdir
        ) as proxy,
    ):
        slow = SlowClients(proxy, SLOW_CLIENTS)
        try:
            slow.trickle_for(2)
            slow.pump_until(lambda: len(slow.closed) == SLOW_CLIENTS)
            assert all(count >= 1 for count in slow.echoed.values())  # admitted, then cut off
            with NormalLoad(proxy) as load:
                wait_until(lambda: min(load.done) >= 5 or load.failures, 30, "normal clients")
            assert load.failures == []
        finally:
            slow.close()
