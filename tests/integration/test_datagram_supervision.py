"""One worker reads each datagram listener, whatever supervision does: a reader killed is
replaced by one that reads the same listener, a rotation hands the listeners to the new
workers, and a SIGTTOU that stops a reader rotates the workers so that none is left
unread. Datagrams sent meanwhile wait in the socket and are answered."""

import os
import signal
from pathlib import Path

from tests.support.proxy import Proxy, run_backend, run_proxy, wait_until

MESSAGES = "tests.support.message_backend"


def exchange(proxy: Proxy, index: int, payload: bytes) -> bytes:
    with proxy.connect(index, timeout=20) as client:
        client.send(payload)
        return client.recv(100)


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def readers(proxy: Proxy, index: int) -> list[int]:
    """The workers holding datagram listener `index` (the others closed their copies)."""
    inode = os.fstat(proxy.listeners[index].fileno()).st_ino
    return [pid for pid in proxy.workers() if inode in socket_inodes(pid)]


def test_each_listener_has_one_reader_through_kills_rotations_and_scaling(
    workdir: Path,
) -> None:
    with (
        run_backend("echo", "udp:127.0.0.1:0", MESSAGES) as backend,
        run_proxy(["-w", "2", backend.target], workdir, listeners=("udp", "udp")) as proxy,
    ):
        for index in (0, 1):
            assert exchange(proxy, index, b"first %d" % index) == b"first %d" % index
        first, second = readers(proxy, 0), readers(proxy, 1)
        assert len(first) == len(second) == 1 and first != second  # spread over the two

        os.kill(first[0], signal.SIGKILL)
        assert exchange(proxy, 0, b"after a kill") == b"after a kill"  # queued, then read
        wait_until(lambda: len(proxy.workers()) == 2, 10, "the replacement")
        assert len(readers(proxy, 0)) == 1 and readers(proxy, 0) != first

        old = set(proxy.workers())
        proxy.signal(signal.SIGHUP)
        wait_until(lambda: not old & set(proxy.workers()), 20, "the old workers to leave")
        for index in (0, 1):
            assert exchange(proxy, index, b"rotated") == b"rotated"
            assert len(readers(proxy, index)) == 1

        old = set(proxy.workers())
        proxy.signal(signal.SIGTTOU)  # stops the reader of listener 1: the workers rotate
        wait_until(
            lambda: len(proxy.workers()) == 1 and not old & set(proxy.workers()),
            20,
            "one new worker reading both listeners",
        )
        for index in (0, 1):
            assert exchange(proxy, index, b"one worker") == b"one worker"
        assert readers(proxy, 0) == readers(proxy, 1) == proxy.workers()


def test_an_added_worker_reads_no_datagram_listener(workdir: Path) -> None:
    with (
        run_backend("echo", "udp:127.0.0.1:0", MESSAGES) as backend,
        run_proxy(["-w", "1", backend.target], workdir, listeners=("udp",)) as proxy,
    ):
        reader = readers(proxy, 0)
        proxy.signal(signal.SIGTTIN)
        wait_until(lambda: len(proxy.workers()) == 2, 10, "the added worker")
        assert readers(proxy, 0) == reader
        assert exchange(proxy, 0, b"still one reader") == b"still one reader"


def test_the_listener_socket_is_closed_where_not_read(workdir: Path) -> None:
    """A worker that does not read a datagram listener holds no copy of it either."""
    with (
        run_backend("echo", "udp:127.0.0.1:0", MESSAGES) as backend,
        run_proxy(["-w", "3", backend.target], workdir, listeners=("udp",)) as proxy,
    ):
        assert len(proxy.workers()) == 3
        assert len(readers(proxy, 0)) == 1
