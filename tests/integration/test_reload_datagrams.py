"""Reloads with datagram listeners: clients looping UDP request/response through
forkproxy get every answer across reloads (the listening socket is kept; datagrams wait
in it while the workers change), each datagram listener has one reader after each
reload, the shared mapping is the same memfd in the master and every worker, old and
new, and the datagram counters go on."""

import os
import signal
import threading
from pathlib import Path

from tests.integration.test_datagram_supervision import exchange, readers
from tests.support.proxy import Proxy, run_backend, run_proxy, wait_until
from tests.support.reloading import reload, reloads, scrape, value

MESSAGES = "tests.support.message_backend"
RELOADS = 5
CLIENTS = 4


class DatagramLoad:
    """`CLIENTS` threads per datagram listener, each sending numbered datagrams from one
    socket (one session) and checking every answer."""

    def __init__(self, proxy: Proxy, listeners: tuple[int, ...]) -> None:
        self.proxy = proxy
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answered = 0
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(index, client))
            for index in listeners
            for client in range(CLIENTS)
        ]

    def _run(self, index: int, client: int) -> None:
        with self.proxy.connect(index, timeout=10) as sock:
            sequence = 0
            while not self.stop.is_set():
                payload = b"listener %d client %d datagram %d" % (index, client, sequence)
                sequence += 1
                try:
                    sock.send(payload)
                    answer = sock.recv(200)
                except OSError as error:
                    answer = repr(error).encode()
                with self.lock:
                    if answer == payload:
                        self.answered += 1
                    else:
                        self.failures.append(f"{payload!r}: {answer[:80]!r}")

    def __enter__(self) -> "DatagramLoad":
        for thread in self.threads:
            thread.start()
        wait_until(lambda: self.answered >= 100, 30, "the datagram load to get going")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def mapped_memfds(pid: int) -> set[int]:
    """The inodes of the forkproxy memfds `pid` maps (the shared mapping's)."""
    with open(f"/proc/{pid}/maps") as maps:
        return {int(line.split()[4]) for line in maps if "/memfd:forkproxy " in line}


def test_datagrams_are_answered_across_reloads(workdir: Path) -> None:
    with (
        run_backend("echo", "udp:127.0.0.1:0", MESSAGES) as backend,
        run_proxy(
            ["-w", "2", backend.target],
            workdir,
            listeners=("udp", "udp", "tcp"),
            names=("one", "two", "metrics"),
        ) as proxy,
    ):
        master = proxy.pid
        mapping = mapped_memfds(master)
        assert len(mapping) == 1
        with DatagramLoad(proxy, (0, 1)) as load:
            for _ in range(RELOADS):
                ready = proxy.notifications.count("READY=1")
                started = load.answered
                old = set(proxy.workers())
                reload(lambda: scrape(proxy, 2), proxy.signal)
                wait_until(
                    lambda ready=ready: proxy.notifications.count("READY=1") == ready + 1,
                    30,
                    "READY=1 after the reload",
                )
                wait_until(lambda old=old: not old & set(proxy.workers()), 30, "old workers")
                assert [len(readers(proxy, index)) for index in (0, 1)] == [1, 1]
                for pid in (master, *proxy.workers()):
                    assert mapped_memfds(pid) == mapping, pid
                wait_until(lambda started=started: load.answered > started + 50, 30, "answers")
        assert load.failures == []
        assert proxy.pid == master
        samples = scrape(proxy, 2)
        assert samples is not None and reloads(samples) == (RELOADS, 0)
        # Every exchange counted, the old workers' counts kept.
        for direction in ("to_target", "to_client"):
            counted = sum(
                value(samples, "forkproxy_datagrams_total", listener=name, direction=direction)
                for name in ("one", "two")
            )
            assert counted >= load.answered
        for name in ("one", "two"):
            # A session per client, and at most one new one per reload.
            sessions = value(samples, "forkproxy_datagram_sessions_total", listener=name)
            assert CLIENTS <= sessions <= CLIENTS * (RELOADS + 1)
        assert proxy.stop(30) == 0
    print(f"{RELOADS} reloads with datagram listeners: {load.answered} exchanges, 0 lost")


def test_a_reload_that_keeps_the_old_workers_keeps_their_datagram_listeners(
    workdir: Path,
) -> None:
    """A section naming no listener passes the check (it sees no sockets) and fails in the
    new image, which goes on with the old workers: a reader killed then is replaced by one
    reading the same listener, as before the reload."""
    config = workdir / "forkproxy.toml"
    with run_backend("echo", "udp:127.0.0.1:0", MESSAGES) as backend:
        settings = f'targets = ["{backend.target}"]\nworkers = 2\n'
        config.write_text(settings)
        with run_proxy(
            ["--config", str(config)],
            workdir,
            listeners=("udp", "udp", "tcp"),
            names=("one", "two", "metrics"),
        ) as proxy:
            for index in (0, 1):
                assert exchange(proxy, index, b"before") == b"before"
            config.write_text(settings + f'[listeners.nosuch]\ntargets = ["{backend.target}"]\n')
            workers = proxy.workers()
            reload(lambda: scrape(proxy, 2), proxy.signal, expect="failed")
            assert "keeping the previous settings and workers" in proxy.stderr()
            assert proxy.workers() == workers
            (reader,) = readers(proxy, 1)
            os.kill(reader, signal.SIGKILL)
            wait_until(
                lambda: len(proxy.workers()) == 2 and reader not in proxy.workers(),
                20,
                "the replacement",
            )
            for index in (0, 1):
                assert exchange(proxy, index, b"after") == b"after"
                assert len(readers(proxy, index)) == 1
            assert readers(proxy, 0) != readers(proxy, 1)
            assert proxy.stop(30) == 0
