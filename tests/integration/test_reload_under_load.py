"""Reloads under load: 20 SIGHUPs in a row while 32 clients loop requests through a real
nginx and one download spans them all. No request fails, the download arrives whole,
the master keeps its PID, and no counter ever goes down."""

import hashlib
import os
import socket
import threading
from pathlib import Path

from tests.support.nginx import NginxFactory
from tests.support.proxy import Proxy, children_of, run_proxy, wait_until
from tests.support.reloading import reload, reloads, scrape, value
from tests.support.supervision import METRICS_LISTENERS, METRICS_NAMES

CLIENTS = 32
RELOADS = 20
BULK_SIZE = 48 << 20
SMALL = b"a short answer\n" * 20


class HttpLoad:
    """`CLIENTS` threads looping GET /small through the proxy, each checked whole."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(CLIENTS)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.proxy.connect(timeout=30) as client:
                    client.sendall(b"GET /small HTTP/1.0\r\nHost: test\r\n\r\n")
                    answer = _read_to_eof(client)
                head, _, body = answer.partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200") or body != SMALL:
                    raise AssertionError(f"bad answer: {answer[:80]!r}")
                with self.lock:
                    self.ok += 1
            except (OSError, AssertionError) as error:
                with self.lock:
                    self.failures.append(repr(error))

    def __enter__(self) -> "HttpLoad":
        for thread in self.threads:
            thread.start()
        wait_until(lambda: self.ok >= 200, 30, "the load to get going")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


class Scraper:
    """Scrapes /metrics every 50 ms; counters must never go down between two answers."""

    COUNTERS = (
        ("forkproxy_connections_accepted_total", {}),
        ("forkproxy_relayed_bytes_total", {"direction": "to_target"}),
        ("forkproxy_relayed_bytes_total", {"direction": "to_client"}),
        ("forkproxy_connection_duration_seconds_count", {}),
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.stop = threading.Event()
        self.answers = 0
        self.unanswered = 0  # scrapes that met an exec
        self.backwards: list[str] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        last: dict[str, float] = {}
        while not self.stop.wait(0.05):  # the pace of the scrapes, not a synchronisation
            samples = scrape(self.proxy)
            if samples is None:
                self.unanswered += 1
                continue
            self.answers += 1
            for name, labels in self.COUNTERS:
                key = f"{name}{labels}"
                now = value(samples, name, **labels)
                if now < last.get(key, 0):
                    self.backwards.append(f"{key}: {last[key]} -> {now}")
                last[key] = now

    def __enter__(self) -> "Scraper":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    return bytes(data)


def _read_exactly(sock: socket.socket, count: int, into: "hashlib._Hash") -> int:
    """Read `count` bytes (fewer at EOF) into the hash; the number read."""
    got = 0
    while got < count:
        chunk = sock.recv(min(1 << 16, count - got))
        if not chunk:
            break
        into.update(chunk)
        got += len(chunk)
    return got


def test_twenty_reloads_under_load_through_nginx(
    workdir: Path, nginx_factory: NginxFactory
) -> None:
    """32 clients loop requests through a real nginx and one long download spans all 20
    reloads: no request fails, the download arrives whole, the master keeps its PID and
    no counter ever goes down."""
    root = workdir / "www"
    root.mkdir()
    (root / "small").write_bytes(SMALL)
    bulk = os.urandom(BULK_SIZE)
    (root / "bulk").write_bytes(bulk)
    nginx = nginx_factory("127.0.0.1:0", root=root)
    args = ["-w", "2", "--graceful-timeout=10min", f"127.0.0.1:{nginx.port}"]
    with run_proxy(args, workdir, listeners=METRICS_LISTENERS, names=METRICS_NAMES) as proxy:
        master = proxy.pid
        with HttpLoad(proxy) as load, Scraper(proxy) as scraper:
            download = proxy.connect(timeout=60)
            download.sendall(b"GET /bulk HTTP/1.0\r\nHost: test\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += download.recv(1)
            assert head.startswith(b"HTTP/1.1 200"), head
            digest = hashlib.sha256()
            received = 0
            durations = []
            for _ in range(RELOADS):
                ready = proxy.notifications.count("READY=1")
                started = load.ok
                durations.append(
                    reload(lambda: scrape(proxy), proxy.signal)  # SIGHUP; counted ok
                )
                wait_until(
                    lambda ready=ready: proxy.notifications.count("READY=1") == ready + 1,
                    30,
                    "READY=1 after the reload",
                )
                assert proxy.process.poll() is None and proxy.pid == master
                wait_until(lambda started=started: load.ok > started + 50, 30, "requests")
                received += _read_exactly(download, BULK_SIZE // (RELOADS + 5), digest)
            received += _read_exactly(download, BULK_SIZE, digest)
            download.close()
        assert load.failures == []
        assert received == BULK_SIZE and digest.digest() == hashlib.sha256(bulk).digest()
        assert scraper.backwards == [] and scraper.answers > RELOADS
        samples = scrape(proxy)
        assert samples is not None and reloads(samples) == (RELOADS, 0)
        assert proxy.notifications.count("RELOADING=1") == RELOADS
        assert len(children_of(master)) >= 2  # the workers are still the master's children
        assert proxy.pid == master and proxy.stop(30) == 0
    print(
        f"{RELOADS} reloads under load: signal to counted ok in "
        f"{min(durations) * 1000:.0f}-{max(durations) * 1000:.0f} ms, "
        f"{load.ok} requests, {scraper.unanswered} scrapes met an exec"
    )
