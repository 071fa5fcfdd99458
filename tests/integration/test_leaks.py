"""No leak over many connections: after 20,000 sequential connections every
forkproxy process holds the descriptors it held before and its memory has stayed flat."""

import socket
from functools import partial
from pathlib import Path

from forkproxy.shared.protocol import PIPE_POOL_KEEP
from tests.support.procfs import fd_kinds, rss_kib
from tests.support.proxy import run_backend, run_proxy, wait_until

WARM_UP = 1_000
CONNECTIONS = 20_000
# Resident memory may grow a little after the warm-up: pages touched for the first time
# by allocator arenas and free lists that reach their working size later. Any object kept
# per connection is 16 bytes or more (a Python object 28 or more) and would add at least
# 20,000 x 16 B = 312 KiB, so a bound of 256 KiB per process fails on any per-connection
# leak while allowing for the one-off growth (measured: at most 40 KiB).
RSS_GROWTH_BOUND_KIB = 256


def request(address: tuple[str, int], index: int) -> None:
    """One short connection: a request, a half-close, the whole echo, the close."""
    payload = b"request %d" % index
    with socket.create_connection(address, timeout=10) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(4096):
            received += chunk
    assert received == payload, f"connection {index}: sent {payload!r}, got {received!r}"


def settled(pids: list[int], sockets: dict[int, int]) -> None:
    """Wait for every process to have closed the sockets of the connections just ended."""
    for pid in pids:
        wait_until(partial(_sockets_are, pid, sockets[pid]), 10, f"{pid}'s sockets")


def _sockets_are(pid: int, count: int) -> bool:
    return fd_kinds(pid)["socket"] == count


def test_20000_sequential_connections_leak_no_fd_and_no_memory(workdir: Path) -> None:
    with run_backend("echo") as backend, run_proxy(["-w", "2", backend.target], workdir) as proxy:
        pids = [proxy.pid, *proxy.workers()]
        idle_sockets = {pid: fd_kinds(pid)["socket"] for pid in pids}
        address = proxy.address()
        assert isinstance(address, tuple)
        for index in range(WARM_UP):
            request(address, index)
        settled(pids, idle_sockets)
        fds_before = {pid: fd_kinds(pid) for pid in pids}
        rss_before = {pid: rss_kib(pid) for pid in pids}

        for index in range(CONNECTIONS):
            request(address, index)

        settled(pids, idle_sockets)
        assert proxy.workers() == pids[1:]  # the same processes throughout
        for pid in pids:
            before, after = fds_before[pid].copy(), fd_kinds(pid)
            # The worker's pipe pool may keep a pipe more if two connections overlapped.
            pipes_before, pipes_after = before.pop("pipe", 0), after.pop("pipe", 0)
            assert after == before, f"process {pid}: descriptors {before} -> {after}"
            assert pipes_before <= pipes_after <= 2 * PIPE_POOL_KEEP + 1
            growth = rss_kib(pid) - rss_before[pid]
            assert growth <= RSS_GROWTH_BOUND_KIB, f"process {pid}: RSS grew {growth} KiB"
