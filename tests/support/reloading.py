"""Watching reloads from tests: scrapes that survive the master's exec, a reload signal
awaited through its counter, and targets that say who they are.

A scrape that meets the exec (its connection closed with the old image) is no answer,
not an error: the metrics socket itself stays open, and the next scrape is the new
image's.
"""

import signal
import socket
import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from tests.support.counting import CountingBackend
from tests.support.proxy import Proxy, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
RELOAD_TIMEOUT = 60.0


def scrape_at(connect: Callable[[], socket.socket]) -> Samples | None:
    """Every sample of one /metrics answer, or None if the scrape met a reload's exec."""
    try:
        with connect() as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: forkproxy\r\n\r\n")
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200") and not head.startswith(b"HTTP/1.1 200"):
        return None
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def scrape(proxy: Proxy, index: int = 1) -> Samples | None:
    """`scrape_at` the proxy's metrics socket, its listener number `index` (the harness's
    METRICS_LISTENERS make it the second)."""
    return scrape_at(lambda: proxy.connect(index))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def reloads(samples: Samples) -> tuple[int, int]:
    """forkproxy_reloads_total: (ok, failed)."""
    ok = value(samples, "forkproxy_reloads_total", result="ok")
    failed = value(samples, "forkproxy_reloads_total", result="failed")
    return int(ok), int(failed)


def reload(
    scraper: Callable[[], Samples | None],
    send: Callable[[int], None],
    expect: str = "ok",
    signum: int = signal.SIGHUP,
) -> float:
    """Send `signum`, wait until the reload is counted as `expect` ("ok" or "failed");
    return the seconds that took. Fails if it is counted otherwise."""
    before = _reloads(scraper)
    started = time.monotonic()
    send(signum)
    now: list[tuple[int, int]] = []

    def counted() -> bool:
        samples = scraper()
        if samples is None:
            return False
        now[:] = [reloads(samples)]
        return sum(now[0]) > sum(before)

    wait_until(counted, RELOAD_TIMEOUT, f"the reload to be counted ({expect})")
    taken = time.monotonic() - started
    ok, failed = now[0]
    expected = (before[0] + 1, before[1]) if expect == "ok" else (before[0], before[1] + 1)
    assert (ok, failed) == expected, f"reloads (ok, failed): {before} -> {(ok, failed)}"
    return taken


def _reloads(scraper: Callable[[], Samples | None]) -> tuple[int, int]:
    got: list[Samples] = []

    def answered() -> bool:
        samples = scraper()
        if samples is not None:
            got.append(samples)
        return samples is not None

    wait_until(answered, 30, "a scrape")
    return reloads(got[-1])


class NamedTarget(CountingBackend):
    """An in-process target that greets each connection with its name and a newline,
    then echoes; counts connections open now."""

    def __init__(self, name: str) -> None:
        super().__init__(greeting=name.encode() + b"\n", echo=True)
        self.name = name

    def __enter__(self) -> "NamedTarget":
        return self


def greeting(client: socket.socket) -> str:
    """The name a NamedTarget greeted `client` with ("" if closed first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = client.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()
