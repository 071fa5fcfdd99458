"""The global --connections-max cap: exact across workers, and reclaimed from dead ones."""

import os
import signal
import socket
from pathlib import Path

import pytest

from tests.support.counting import CountingBackend, outcome
from tests.support.proxy import run_proxy, wait_until


def _burst(proxy, count: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """Open `count` connections at once; split them into admitted and refused."""
    clients = [proxy.connect(timeout=10) for _ in range(count)]
    admitted, refused = [], []
    for client in clients:
        (admitted if outcome(client) == "admitted" else refused).append(client)
    for client in refused:
        client.close()
    return admitted, refused


@pytest.mark.parametrize("workers", [2, 4])
def test_bursts_never_exceed_the_cap(workdir: Path, workers: int) -> None:
    cap = 8
    with (
        CountingBackend() as backend,
        run_proxy(["-c", str(cap), "-w", str(workers), backend.target], workdir) as proxy,
    ):
        for _ in range(3):
            admitted, refused = _burst(proxy, 200)
            # Everyone holds on, so exactly `cap` get through and the rest are refused
            # without ever reaching the target.
            assert len(admitted) == cap
            assert len(refused) == 200 - cap
            assert backend.peak == cap
            for client in admitted:
                client.close()
            wait_until(lambda: backend.current == 0, 10, "the backend to see every close")
        assert backend.total == 3 * cap
        # After the bursts the full capacity is there again.
        admitted, refused = _burst(proxy, cap)
        assert (len(admitted), len(refused)) == (cap, 0)
        for client in admitted:
            client.close()


def test_cap_of_one_admits_exactly_one(workdir: Path) -> None:
    """systemd-socket-proxyd -c 1 lets two through; forkproxy admits exactly one."""
    with (
        CountingBackend() as backend,
        run_proxy(["-c", "1", "-w", "2", backend.target], workdir) as proxy,
    ):
        admitted, refused = _burst(proxy, 5)
        assert (len(admitted), len(refused)) == (1, 4)
        assert backend.peak == 1
        admitted[0].close()


def test_capacity_of_killed_workers_is_reclaimed(workdir: Path) -> None:
    cap = 4
    with (
        CountingBackend() as backend,
        run_proxy(["-c", str(cap), "-w", "2", backend.target], workdir) as proxy,
    ):
        admitted, refused = _burst(proxy, cap + 1)
        assert (len(admitted), len(refused)) == (cap, 1)
        old_workers = proxy.workers()
        for pid in old_workers:  # every worker holding the capped connections
            os.kill(pid, signal.SIGKILL)
        for client in admitted:
            assert client.recv(1) in (b"",)  # their connections died with them
            client.close()
        wait_until(
            lambda: len(proxy.workers()) == 2 and not set(proxy.workers()) & set(old_workers),
            10,
            "replacement workers",
        )
        admitted, refused = _burst(proxy, cap + 1)
        assert (len(admitted), len(refused)) == (cap, 1)  # no capacity leaked, none extra
        for client in admitted:
            client.close()


def test_refused_connection_gets_nothing_and_target_sees_nothing(workdir: Path) -> None:
    with (
        CountingBackend() as backend,
        run_proxy(["-c", "1", "-w", "1", backend.target], workdir) as proxy,
    ):
        first = proxy.connect()
        assert outcome(first) == "admitted"
        second = proxy.connect()
        second.sendall(b"must not reach the target")
        try:
            assert second.recv(100) == b""
        except ConnectionResetError:
            pass
        assert backend.total == 1
        first.close()
        second.close()
