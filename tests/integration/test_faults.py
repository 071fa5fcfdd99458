"""Faults from the network and from the machine: resets on either side, file
descriptors running out, a worker SIGKILLed under load. Each failure stays in the
connections it hits; everything else arrives intact, and nothing leaks."""

import hashlib
import os
import re
import resource
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from forkproxy.shared.protocol import PIPE_POOL_KEEP
from tests.support.procfs import cpu_seconds, fd_kinds, owners_of_clients
from tests.support.proxy import Proxy, run_backend, run_proxy, wait_until
from tests.support.scripted import (
    LINGER_RESET,
    ScriptedBackend,
    open_script,
    pattern,
    read_exactly,
    read_to_end,
)

FD_LIMIT = 64  # RLIMIT_NOFILE, soft and hard, for the exhaustion test
# How long an exhausted forkproxy is watched for spinning: long enough for several
# ACCEPT_PAUSE (0.5s) rounds, short enough for the suite.
OBSERVATION_WINDOW = 2.0
SPIN_MARGIN = 0.2  # CPU time over the window must stay below this share of wall time
LOG_INTERVAL = 10.0  # logs.RateLimitedLog's default interval


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    """Client sockets a test opens: closed at teardown, also when the test fails."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def echo_exactly(sock: socket.socket, payload: bytes) -> bytes:
    """Send `payload` (from a thread) and read as many bytes back; the connection stays open."""
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    received = bytearray()
    try:
        while len(received) < len(payload):
            chunk = sock.recv(min(1 << 20, len(payload) - len(received)))
            if not chunk:
                break
            received += chunk
    finally:
        sender.join()
    return bytes(received)


def lowest_free_fd(pid: int) -> int:
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 1)) - used)


def socket_count(pid: int) -> int:
    return fd_kinds(pid)["socket"]


def assert_no_leak(pid: int, baseline: dict[str, int]) -> None:
    """Every descriptor is back but pipes, which the pool keeps (at most PIPE_POOL_KEEP)."""
    now = fd_kinds(pid)
    pipes = now.pop("pipe", 0) - baseline.get("pipe", 0)
    assert 0 <= pipes <= 2 * PIPE_POOL_KEEP
    assert dict(now) == {kind: n for kind, n in baseline.items() if kind != "pipe"}


def total_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def pausing_lines(proxy: Proxy) -> list[str]:
    return [line for line in proxy.stderr().splitlines() if "pausing accepts" in line]


def serve_waiting(clients: dict[socket.socket, bytes], timeout: float = 30.0) -> list[bytes]:
    """Wait for every client to get its greeting echoed; returns what the dropped ones got."""
    dropped = []
    deadline = time.monotonic() + timeout
    while clients:
        assert time.monotonic() < deadline, f"{len(clients)} clients never served"
        readable, _, _ = select.select(list(clients), [], [], 1.0)
        for client in readable:
            expected = clients.pop(client)
            try:
                got = client.recv(len(expected), socket.MSG_WAITALL)
            except ConnectionResetError:
                got = b"<reset>"
            if got != expected:
                dropped.append(got)
            client.close()
    return dropped


def test_a_failing_accept_pauses_instead_of_spinning(
    workdir: Path, opened: list[socket.socket]
) -> None:
    """accept() fails with EMFILE: clients wait in the backlog, no busy loop, served later."""
    with run_backend("echo") as backend, run_proxy(["-w", "1", backend.target], workdir) as proxy:
        (worker,) = proxy.workers()
        idle_sockets = socket_count(worker)
        with proxy.connect() as client:
            assert echo_exactly(client, b"warm") == b"warm"  # the pipe pool has pipes now
        wait_until(lambda: socket_count(worker) == idle_sockets, 10, "the worker to close")
        baseline = fd_kinds(worker)
        soft, hard = resource.prlimit(worker, resource.RLIMIT_NOFILE)
        # RLIMIT_NOFILE bounds descriptor numbers: with the limit at the lowest free one,
        # the worker's next accept() fails with EMFILE.
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (lowest_free_fd(worker), hard))
        waiting = {}
        try:
            for index in range(20):
                client = proxy.connect()
                opened.append(client)
                client.sendall(b"client %02d" % index)
                waiting[client] = b"client %02d" % index
            wait_until(lambda: pausing_lines(proxy), 10, "the worker to pause accepting")
            cpu_before, started = total_cpu([worker, proxy.pid]), time.monotonic()
            time.sleep(OBSERVATION_WINDOW)  # the episode being measured, not a wait
            wall = time.monotonic() - started
            used = total_cpu([worker, proxy.pid]) - cpu_before
            assert used < SPIN_MARGIN * wall, f"{used:.2f}s CPU in {wall:.2f}s: spinning"
            assert all(not select.select([c], [], [], 0)[0] for c in waiting), "nobody served"
            assert proxy.process.poll() is None
        finally:
            resource.prlimit(worker, resource.RLIMIT_NOFILE, (soft, hard))
        assert serve_waiting(waiting) == []  # none dropped: they waited in the backlog
        lines = pausing_lines(proxy)
        assert 1 <= len(lines) <= 1 + (time.monotonic() - started) / LOG_INTERVAL + 1, lines
        assert "cannot accept on" in lines[0] and "Too many open files" in lines[0]
        with proxy.connect() as client:
            assert echo_exactly(client, b"normal again") == b"normal again"
        wait_until(lambda: socket_count(worker) == baseline["socket"], 10, "sockets closed")
        assert_no_leak(worker, baseline)


def test_no_descriptor_for_the_target_connection_keeps_the_client_waiting(
    workdir: Path, opened: list[socket.socket]
) -> None:
    """accept() gets the last descriptor and socket() for the target fails with EMFILE:
    the client is kept (not closed), accepting pauses, and it is served once fds free."""
    with run_backend("echo") as backend, run_proxy(["-w", "1", backend.target], workdir) as proxy:
        (worker,) = proxy.workers()
        idle_sockets = socket_count(worker)
        with proxy.connect() as client:
            assert echo_exactly(client, b"warm") == b"warm"
        wait_until(lambda: socket_count(worker) == idle_sockets, 10, "the worker to close")
        soft, hard = resource.prlimit(worker, resource.RLIMIT_NOFILE)
        # One descriptor left: the next accept() takes it, the target socket() has none.
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (lowest_free_fd(worker) + 1, hard))
        waiting = {}
        try:
            for index in range(5):
                client = proxy.connect()
                opened.append(client)
                client.sendall(b"client %d" % index)
                waiting[client] = b"client %d" % index
            wait_until(lambda: "connection to target" in proxy.stderr(), 10, "socket() to fail")
            readable, _, _ = select.select(list(waiting), [], [], 0)
            assert readable == [], "a client was closed (or served without a descriptor)"
            assert "cannot open a connection to target" in proxy.stderr()
        finally:
            resource.prlimit(worker, resource.RLIMIT_NOFILE, (soft, hard))
        assert serve_waiting(waiting) == []


def test_open_connections_keep_flowing_while_new_clients_exhaust_fds(
    workdir: Path, opened: list[socket.socket]
) -> None:
    """Launched with RLIMIT_NOFILE 64: a flood of clients cannot take the descriptors the
    open connections need for their pipes; the flood waits and is served afterwards."""
    with (
        run_backend("echo") as backend,
        run_proxy(
            ["-w", "1", "-c", "1000", backend.target],
            workdir,
            wrapper=["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}"],
        ) as proxy,
    ):
        (worker,) = proxy.workers()
        assert resource.prlimit(worker, resource.RLIMIT_NOFILE) == (FD_LIMIT, FD_LIMIT)
        idle_sockets = socket_count(worker)
        # The reserve kept free: a quarter of what was free at start, at most 32.
        free_from = lowest_free_fd(worker)
        reserve = min(32, (FD_LIMIT - free_from) // 4)
        reserve_at_start = min(32, (FD_LIMIT - free_from + 1) // 4)
        # Relayed but quiet, so the worker has made no pipe yet: it needs new ones later.
        established = [proxy.connect(timeout=30) for _ in range(3)]
        opened.extend(established)
        wait_until(
            lambda: socket_count(worker) == idle_sockets + 2 * len(established),
            10,
            "the target connections",
        )
        # Far more than 64 descriptors can hold; they stay quiet (no pipes needed) until the
        # open connections need theirs.
        flood = {proxy.connect(): b"flood %02d" % index for index in range(60)}
        opened.extend(flood)
        wait_until(lambda: pausing_lines(proxy), 10, "the worker to run short of descriptors")
        # The worker works its reserve out at start, before its loop has opened all of its
        # own descriptors: one fewer may have been open then than now.
        said = re.search(
            r"fewer than (\d+) file descriptors left \(RLIMIT_NOFILE (\d+)\)",
            pausing_lines(proxy)[0],
        )
        assert said is not None and int(said[2]) == FD_LIMIT
        assert int(said[1]) in (reserve, reserve_at_start)

        # Out of descriptors, and the open connections still move megabytes both ways.
        cpu_before, started = total_cpu([worker, proxy.pid]), time.monotonic()
        payloads = [os.urandom(1 << 20) for _ in established]
        results: list[bytes] = [b""] * len(established)

        def transfer(index: int) -> None:
            results[index] = echo_exactly(established[index], payloads[index])

        threads = [threading.Thread(target=transfer, args=(i,)) for i in range(len(established))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for payload, result in zip(payloads, results, strict=True):
            assert hashlib.sha256(result).digest() == hashlib.sha256(payload).digest()
        time.sleep(max(0.0, OBSERVATION_WINDOW - (time.monotonic() - started)))  # the episode
        wall = time.monotonic() - started
        used = total_cpu([worker, proxy.pid]) - cpu_before
        assert used < SPIN_MARGIN * wall + 0.3, f"{used:.2f}s CPU in {wall:.2f}s"  # 3 MiB relayed
        assert proxy.process.poll() is None

        for client in established:
            client.close()
        for client, greeting in flood.items():
            client.sendall(greeting)
        assert serve_waiting(flood) == []  # the flood waited; nobody was dropped
        with proxy.connect() as client:
            assert echo_exactly(client, b"normal again") == b"normal again"
        assert "failed: [Errno 24]" not in proxy.stderr()


# -- resets and kills ------------------------------------------------------------------

STREAM_SIZE = 4 << 20  # what each surviving connection receives: half before, half after
VICTIM_SIZE = 256 << 10


class Streams:
    """Connections through the proxy that are each half way through a STREAM_SIZE download."""

    def __init__(self, proxy: Proxy, backend: ScriptedBackend, prefix: str, count: int) -> None:
        self.backend = backend
        self.clients: dict[str, socket.socket] = {}
        for index in range(count):
            self.add(proxy, f"{prefix}{index}")

    def add(self, proxy: Proxy, name: str) -> socket.socket:
        client = proxy.connect(timeout=30)
        open_script(client, "stream", name, STREAM_SIZE)
        half = read_exactly(client, STREAM_SIZE // 2)
        assert half == pattern(name, STREAM_SIZE)[: STREAM_SIZE // 2]
        self.clients[name] = client
        return client

    def finish(self, names: list[str] | None = None) -> dict[str, tuple[bool, str]]:
        """Let the backend send the second halves; per name: intact?, how it ended."""
        outcome = {}
        for name in self.clients if names is None else names:
            self.backend.release(name)
        for name in self.clients if names is None else names:
            rest, how = read_to_end(self.clients[name])
            intact = rest == pattern(name, STREAM_SIZE)[STREAM_SIZE // 2 :] and how == "eof"
            outcome[name] = (intact, how)
        return outcome

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def _sockets_are(pid: int, count: int) -> bool:
    return socket_count(pid) == count


def settled_fds(pids: list[int], baseline: dict[int, dict[str, int]]) -> None:
    for pid in pids:
        wait_until(partial(_sockets_are, pid, baseline[pid]["socket"]), 10, f"the sockets of {pid}")
        assert_no_leak(pid, baseline[pid])


def test_target_reset_closes_that_client_and_nothing_else(workdir: Path) -> None:
    with (
        ScriptedBackend() as backend,
        run_proxy(["-w", "1", backend.target], workdir) as proxy,
    ):
        pids = [proxy.pid, *proxy.workers()]
        baseline = {pid: dict(fd_kinds(pid)) for pid in pids}
        streams = Streams(proxy, backend, "good", 6)
        victims = []
        try:
            for index in range(3):  # one worker: the victims share it with the streams
                victim = proxy.connect(timeout=30)
                victims.append(victim)
                open_script(victim, "reset", f"victim{index}", VICTIM_SIZE)
                assert read_exactly(victim, VICTIM_SIZE) == pattern(f"victim{index}", VICTIM_SIZE)
            for index, victim in enumerate(victims):
                backend.release(f"victim{index}")  # RST from the target, mid-connection
                assert read_to_end(victim)[0] == b""  # closed by the proxy: EOF or reset
            assert all(intact for intact, _ in streams.finish().values())
        finally:
            streams.close()
            for victim in victims:
                victim.close()
        settled_fds(pids, baseline)
        assert "failed" not in proxy.stderr()  # a reset is a normal end: no warning


def test_client_reset_closes_the_target_connection_and_nothing_else(workdir: Path) -> None:
    with (
        ScriptedBackend() as backend,
        run_proxy(["-w", "1", backend.target], workdir) as proxy,
    ):
        pids = [proxy.pid, *proxy.workers()]
        baseline = {pid: dict(fd_kinds(pid)) for pid in pids}
        streams = Streams(proxy, backend, "good", 6)
        try:
            for index in range(3):
                name = f"victim{index}"
                victim = proxy.connect(timeout=30)
                open_script(victim, "hold", name, VICTIM_SIZE)
                assert read_exactly(victim, VICTIM_SIZE // 2)  # mid-transfer
                victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                victim.close()  # RST: unread bytes and SO_LINGER 0
                wait_until(partial(dict.__contains__, backend.ended, name), 10, f"{name} ended")
                assert backend.ended[name] in ("eof", "reset", "broken pipe")
            assert all(intact for intact, _ in streams.finish().values())
        finally:
            streams.close()
        settled_fds(pids, baseline)
        assert "failed" not in proxy.stderr()


def test_sigkill_of_a_worker_fails_only_its_own_connections(workdir: Path) -> None:
    with (
        ScriptedBackend() as backend,
        run_proxy(["-w", "2", backend.target], workdir) as proxy,
    ):
        workers = proxy.workers()
        assert len(workers) == 2
        address = proxy.address()
        assert isinstance(address, tuple)
        listen_port = address[1]
        streams = Streams(proxy, backend, "load", 0)
        try:
            owners: dict[str, int] = {}
            # Each worker must hold some (which one accepts is the kernel's choice).
            for index in range(64):
                client = streams.add(proxy, f"load{index}")
                by_port = owners_of_clients(workers, listen_port)
                owners[f"load{index}"] = by_port[client.getsockname()[1]]
                held = set(owners.values())
                if (
                    index >= 8
                    and held == set(workers)
                    and min(list(owners.values()).count(pid) for pid in workers) >= 3
                ):
                    break
            assert set(owners.values()) == set(workers), "one worker took every connection"
            victim = workers[0]
            os.kill(victim, signal.SIGKILL)  # every connection is half way through
            outcome = streams.finish()
        finally:
            streams.close()
        failed = {name for name, (intact, _) in outcome.items() if not intact}
        owned = {name for name, pid in owners.items() if pid == victim}
        assert failed == owned  # those of the killed worker, and only those
        wait_until(lambda: len(proxy.workers()) == 2, 10, "a replacement worker")
        after = Streams(proxy, backend, "after", 1)  # served by the survivor or the new one
        try:
            assert after.finish() == {"after0": (True, "eof")}
        finally:
            after.close()
