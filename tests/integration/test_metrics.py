"""Metrics from the real program: scraped with a real HTTP client, parsed with
prometheus_client's parser, checked against traffic the test made itself."""

import http.client
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.counting import CountingBackend, outcome
from tests.support.proxy import (
    FORKPROXY,
    Proxy,
    children_of,
    run_backend,
    run_proxy,
    send_all_then_read,
    wait_until,
)

Where = str | tuple[str, int]  # a unix socket path, or (host, port)
Key = tuple[str, tuple[tuple[str, str], ...]]

# Passed by the harness: the proxied socket, then the metrics socket.
LISTENERS = ("tcp", "tcp")
NAMES = ("proxy", "metrics")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def fetch(where: Where, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    """Status, Content-Type and body of one request to the metrics endpoint."""
    if isinstance(where, str):
        connection: http.client.HTTPConnection = _UnixHTTPConnection(where, timeout=10)
    else:
        connection = http.client.HTTPConnection(where[0], where[1], timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def families(where: Where) -> dict[str, str]:
    """Family name -> type, from one scrape."""
    status, _, body = fetch(where, "/metrics")
    assert status == 200
    return {family.name: family.type for family in text_string_to_metric_families(body.decode())}


def scrape(where: Where) -> dict[Key, float]:
    status, content_type, body = fetch(where, "/metrics")
    assert (status, content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: dict[Key, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def summed(samples: dict[Key, float], name: str) -> float:
    """The sum of a metric over all its labels."""
    return sum(number for (sample, _), number in samples.items() if sample == name)


def metrics_at(proxy: Proxy) -> tuple[str, int]:
    host, port = proxy.address(1)[:2]  # type: ignore[index]
    return host, port


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def listening_unix_socket_inodes(path: str) -> set[int]:
    """Inodes of the sockets listening on `path`, from /proc/net/unix."""
    with open("/proc/net/unix") as table:
        rows = [line.split() for line in table.read().splitlines()[1:]]
    # Flags 00010000 is __SO_ACCEPTCON: listening (accepted sockets show the path too).
    return {
        int(row[6]) for row in rows if len(row) == 8 and row[7] == path and row[3] == "00010000"
    }


def _free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().replace(b"\0", b" ").decode().strip()


def _promtool() -> str | None:
    promtool = shutil.which("promtool")
    if promtool is None and os.environ.get("CI"):
        pytest.fail("promtool is missing (apt-get install prometheus) and $CI is set")
    return promtool


@pytest.fixture
def echo_target() -> Iterator[str]:
    with run_backend("echo") as backend:
        yield backend.target


# -- counts -------------------------------------------------------------------------------


def test_counts_match_the_traffic_exactly(workdir: Path) -> None:
    sizes = [0, 1, 1000, 65536, 3 << 20, 12345, 7, 200_000]
    with (
        run_backend("digest") as backend,
        run_proxy(["-w", "2", backend.target], workdir, listeners=LISTENERS, names=NAMES) as proxy,
    ):
        where = metrics_at(proxy)
        before = scrape(where)
        replies = []
        for index, size in enumerate(sizes):
            with proxy.connect(timeout=30) as client:
                replies.append(send_all_then_read(client, bytes([index]) * size))
            assert replies[-1].endswith(b" %d\n" % size)
        wait_until(
            lambda: value(scrape(where), "forkproxy_connections_active") == 0,
            10,
            "active connections to return to 0",
        )
        after = scrape(where)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    m = len(sizes)
    assert grew("forkproxy_connections_accepted_total") == m
    assert grew("forkproxy_relayed_bytes_total", direction="to_target") == sum(sizes)
    assert grew("forkproxy_relayed_bytes_total", direction="to_client") == sum(map(len, replies))
    assert grew("forkproxy_connections_refused_total") == 0
    errors = "forkproxy_target_connect_errors_total"
    assert summed(after, errors) - summed(before, errors) == 0
    assert grew("forkproxy_connect_duration_seconds_count") == m
    assert grew("forkproxy_connect_duration_seconds_bucket", le="+Inf") == m
    assert grew("forkproxy_connection_duration_seconds_count") == m
    assert value(after, "forkproxy_connections_max") == 256
    assert value(after, "forkproxy_workers", generation="current") == 2
    assert value(after, "forkproxy_workers", generation="draining") == 0

    def per_worker(name: str, **labels: str) -> float:
        return sum(
            count
            for (sample, sample_labels), count in after.items()
            if sample == name and set(labels.items()) <= set(sample_labels)
        )

    assert per_worker("forkproxy_worker_connections_accepted_total") == m
    for direction in ("to_target", "to_client"):
        total = value(after, "forkproxy_relayed_bytes_total", direction=direction)
        assert per_worker("forkproxy_worker_relayed_bytes_total", direction=direction) == total


def test_refused_counts_exactly_the_refusals(workdir: Path) -> None:
    refusals = 5
    with (
        CountingBackend() as backend,
        run_proxy(
            ["-c", "2", "-w", "2", backend.target], workdir, listeners=LISTENERS, names=NAMES
        ) as proxy,
    ):
        where = metrics_at(proxy)
        before = scrape(where)
        held = [proxy.connect() for _ in range(2)]
        assert [outcome(client) for client in held] == ["admitted", "admitted"]
        for _ in range(refusals):
            with proxy.connect() as client:
                assert outcome(client) == "refused"  # EOF (or reset) at once
        # A refused client can see its EOF just before the worker counts it.
        wait_until(
            lambda: (
                value(scrape(where), "forkproxy_connections_refused_total")
                >= value(before, "forkproxy_connections_refused_total") + refusals
            ),
            10,
            "the refusals to be counted",
        )
        during = scrape(where)
        assert value(during, "forkproxy_connections_active") == 2
        for client in held:
            client.close()
        wait_until(
            lambda: value(scrape(where), "forkproxy_connections_active") == 0,
            10,
            "active connections to return to 0",
        )
        after = scrape(where)
        assert backend.total == 2
    refused = "forkproxy_connections_refused_total"
    accepted = "forkproxy_connections_accepted_total"
    assert value(after, refused) - value(before, refused) == refusals
    assert value(after, accepted) - value(before, accepted) == 2
    assert value(after, "forkproxy_connections_max") == 2


def test_counters_never_go_back_when_a_worker_is_killed(workdir: Path, echo_target: str) -> None:
    with run_proxy(["-w", "2", echo_target], workdir, listeners=LISTENERS, names=NAMES) as proxy:
        where = metrics_at(proxy)
        for index in range(10):
            with proxy.connect() as client:
                assert send_all_then_read(client, b"x" * (index + 1)) == b"x" * (index + 1)
        wait_until(
            lambda: value(scrape(where), "forkproxy_connections_active") == 0, 10, "no connection"
        )
        before = scrape(where)
        types = families(where)
        # Kill the busiest worker, so that its counters have to be kept.
        busiest = max(
            (count, dict(labels)["worker"])
            for (name, labels), count in before.items()
            if name == "forkproxy_worker_connections_accepted_total"
        )[1]
        old_workers = proxy.workers()
        (victim,) = [pid for pid in old_workers if _title(pid) == f"forkproxy: worker {busiest}"]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: victim not in proxy.workers() and len(proxy.workers()) == 2,
            10,
            "a replacement worker",
        )
        wait_until(lambda: fetch(where, "/healthz")[0] == 200, 10, "healthz 200 again")
        after = scrape(where)
        with proxy.connect() as client:
            assert send_all_then_read(client, b"one more") == b"one more"
        wait_until(
            lambda: value(scrape(where), "forkproxy_connections_active") == 0, 10, "no connection"
        )
        last = scrape(where)

    monotonic = {name for name, kind in types.items() if kind in ("counter", "histogram")}
    checked = 0
    for (name, labels), count in before.items():
        family = name.removesuffix("_total").removesuffix("_bucket").removesuffix("_count")
        family = family.removesuffix("_sum")
        if family in monotonic and (name, labels) in after:
            assert after[(name, labels)] >= count, (name, labels)
            checked += 1
        elif family in monotonic and name.startswith("forkproxy_"):
            raise AssertionError(f"{name}{dict(labels)} disappeared after the kill")
    assert checked >= 40  # counters, buckets, per-worker series, process_cpu
    restarts = "forkproxy_worker_restarts_total"
    assert value(after, restarts) == value(before, restarts) + 1
    accepted = "forkproxy_connections_accepted_total"
    assert value(after, accepted) == value(before, accepted) == 10
    assert value(last, accepted) == 11
    assert value(last, "forkproxy_worker_connections_accepted_total", worker=busiest) >= value(
        before, "forkproxy_worker_connections_accepted_total", worker=busiest
    )


# -- where metrics are served -------------------------------------------------------------


@pytest.mark.parametrize("names", [("proxy", "metrics"), ("metrics", "proxy")])
def test_a_passed_metrics_socket_serves_metrics_and_is_never_proxied(
    workdir: Path, names: tuple[str, str]
) -> None:
    metrics_index = names.index("metrics")
    proxy_index = 1 - metrics_index
    with (
        CountingBackend() as backend,
        run_proxy(
            ["-w", "2", backend.target], workdir, listeners=("tcp", "tcp"), names=names
        ) as proxy,
    ):
        host, port = proxy.address(metrics_index)[:2]  # type: ignore[index]
        where = (host, port)
        for _ in range(3):
            assert value(scrape(where), "forkproxy_connections_accepted_total") == 0
        # Not HTTP: still answered by the endpoint, never relayed.
        with socket.create_connection(where, timeout=10) as raw:
            raw.sendall(b"hello backend\r\n\r\n")
            assert raw.recv(64).startswith(b"HTTP/1.1 400 ")
        assert backend.total == 0
        assert value(scrape(where), "forkproxy_connections_accepted_total") == 0
        # The workers never hold it; the master does.
        inode = os.fstat(proxy.listeners[metrics_index].fileno()).st_ino
        assert inode in socket_inodes(proxy.pid)
        for worker in proxy.workers():
            assert inode not in socket_inodes(worker)
        with proxy.connect(proxy_index) as client:
            assert outcome(client) == "admitted"
        assert value(scrape(where), "forkproxy_connections_accepted_total") == 1
        assert f"serving metrics on fd {3 + metrics_index} 'metrics'" in proxy.stderr()


@pytest.mark.parametrize("kind", ["unix", "tcp", "tcp6"])
def test_metrics_option(workdir: Path, echo_target: str, kind: str) -> None:
    if kind == "tcp6" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    where: Where
    if kind == "unix":
        where = str(workdir / "metrics.sock")
        option = where
    elif kind == "tcp":
        where = ("127.0.0.1", _free_port())
        option = f"127.0.0.1:{where[1]}"
    else:
        where = ("::1", _free_port("::1"))
        option = f"[::1]:{where[1]}"
    with run_proxy(["-w", "2", "--metrics", option, echo_target], workdir) as proxy:
        with proxy.connect() as client:
            assert send_all_then_read(client, b"ping") == b"ping"
        wait_until(
            lambda: value(scrape(where), "forkproxy_connections_accepted_total") == 1,
            10,
            "the connection to be counted",
        )
        assert fetch(where, "/healthz") == (
            200,
            "text/plain; charset=utf-8",
            b"2 of 2 workers serving\n",
        )
        if isinstance(where, str):
            assert stat.S_IMODE(os.stat(where).st_mode) == 0o666  # as --listen, --socket-mode
            (inode,) = listening_unix_socket_inodes(where)
            assert inode in socket_inodes(proxy.pid)
            for worker in proxy.workers():
                assert inode not in socket_inodes(worker)
        assert proxy.stop() == 0
    if isinstance(where, str):
        assert not os.path.exists(where)  # it created the file, so it removes it


def test_metrics_under_systemd_socket_activate(workdir: Path, echo_target: str) -> None:
    proxy_port, metrics_port = _free_port(), _free_port()
    command = [
        "systemd-socket-activate",
        "-l",
        f"127.0.0.1:{proxy_port}",
        "-l",
        f"127.0.0.1:{metrics_port}",
        "--fdname=proxy:metrics",
        FORKPROXY,
        "-w",
        "2",
        echo_target,
    ]
    with open(workdir / "activate.log", "wb") as log:
        process = subprocess.Popen(command, stderr=log, start_new_session=True)
    where = ("127.0.0.1", metrics_port)

    def healthy() -> bool:
        try:
            return fetch(where, "/healthz")[0] == 200
        except ConnectionRefusedError:
            return False  # systemd-socket-activate is not listening yet

    try:
        wait_until(healthy, 15, "metrics through the socket named 'metrics'")
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as client:
            assert send_all_then_read(client, b"relayed") == b"relayed"
        with socket.create_connection(where, timeout=10) as raw:
            raw.sendall(b"not relayed\r\n\r\n")
            assert raw.recv(64).startswith(b"HTTP/1.1 400 ")
        wait_until(
            lambda: value(scrape(where), "forkproxy_connections_accepted_total") == 1,
            10,
            "exactly the one relayed connection counted",
        )
        # systemd-socket-activate execs forkproxy: the master has its pid; fd 4 is 'metrics'.
        inode = os.stat(f"/proc/{process.pid}/fd/4").st_ino
        workers = children_of(process.pid)
        assert len(workers) == 2
        for worker in workers:
            assert inode not in socket_inodes(worker)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# -- health and the format ----------------------------------------------------------------


def test_healthz_is_503_while_stopping(workdir: Path, echo_target: str) -> None:
    with run_proxy(
        ["-w", "2", "--graceful-timeout=60", echo_target], workdir, listeners=LISTENERS, names=NAMES
    ) as proxy:
        where = metrics_at(proxy)
        url = f"http://{where[0]}:{where[1]}/healthz"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert (response.status, response.read()) == (200, b"2 of 2 workers serving\n")
        held = proxy.connect()
        held.sendall(b"a")
        assert held.recv(1) == b"a"
        proxy.signal(signal.SIGTERM)
        wait_until(lambda: fetch(where, "/healthz")[0] == 503, 10, "healthz 503")
        assert fetch(where, "/healthz")[2] == b"stopping\n"
        held.close()
        assert proxy.wait(15) == 0


def test_healthz_is_503_soon_after_every_worker_froze(workdir: Path, echo_target: str) -> None:
    """Frozen workers (SIGSTOP) no longer count as serving once their heartbeat is a few
    intervals old (1 s each here), long before the 60 s worker timeout replaces them."""
    with run_proxy(
        ["-w", "2", "--worker-timeout=60s", echo_target],
        workdir,
        listeners=LISTENERS,
        names=NAMES,
    ) as proxy:
        where = metrics_at(proxy)
        status, _, body = fetch(where, "/healthz")
        assert (status, body) == (200, b"2 of 2 workers serving\n")
        workers = proxy.workers()
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            # Each worker's heartbeat goes stale on its own schedule: 503 comes with the
            # first, "0 of 2" once both are.
            frozen = (503, b"0 of 2 workers serving, 2 not responding\n")
            wait_until(lambda: fetch(where, "/healthz")[::2] == frozen, 10, "healthz 503")
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        wait_until(lambda: fetch(where, "/healthz")[0] == 200, 10, "healthz 200 again")
        assert proxy.workers() == workers  # the same workers, thawed


def test_idle_connections_do_not_delay_a_health_probe(workdir: Path, echo_target: str) -> None:
    """50 connections held open without a request (any local user can) must not keep a
    probe waiting: without room for it, it would wait for idle ones to time out (10 s)."""
    with run_proxy(["-w", "2", echo_target], workdir, listeners=LISTENERS, names=NAMES) as proxy:
        where = metrics_at(proxy)
        idle = [socket.create_connection(where, timeout=10) for _ in range(50)]
        try:
            for _ in range(3):
                connection = http.client.HTTPConnection(*where, timeout=5)
                try:
                    connection.request("GET", "/healthz")
                    response = connection.getresponse()
                    assert (response.status, response.read()) == (
                        200,
                        b"2 of 2 workers serving\n",
                    )
                finally:
                    connection.close()
        finally:
            for sock in idle:
                sock.close()


def test_promtool_finds_nothing_in_a_real_scrape(workdir: Path) -> None:
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool is missing (Debian package prometheus)")
    with (
        run_backend("digest") as backend,
        run_proxy(["-w", "2", backend.target], workdir, listeners=LISTENERS, names=NAMES) as proxy,
    ):
        for size in (10, 100_000):
            with proxy.connect() as client:
                send_all_then_read(client, b"z" * size)
        status, _, body = fetch(metrics_at(proxy), "/metrics")
    assert status == 200
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, b"")


def test_the_health_request_that_starts_forkproxy_gets_200_once_workers_serve(
    workdir: Path, echo_target: str
) -> None:
    """Socket activation of the metrics socket: the probe's connection is what starts
    forkproxy, so its request is read before any worker serves. It is answered when
    they do (after READY=1), with 200, not with an early 503."""
    with run_proxy(
        ["-w", "2", echo_target], workdir, listeners=LISTENERS, names=NAMES, wait_ready=False
    ) as proxy:
        with socket.create_connection(proxy.address(1), timeout=30) as probe:  # type: ignore[arg-type]
            probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = bytearray()
            while chunk := probe.recv(4096):
                response += chunk
        assert "READY=1" in proxy.notifications.lines()
        assert bytes(response).startswith(b"HTTP/1.1 200 OK\r\n"), bytes(response)
        assert bytes(response).endswith(b"\r\n\r\n2 of 2 workers serving\n")
        assert proxy.stop() == 0


def test_scrapes_are_not_relay_activity_and_do_not_hold_off_exit_idle_time(
    workdir: Path, echo_target: str
) -> None:
    """Prometheus scraping every few hundred milliseconds must not keep an idle forkproxy
    running: only relayed connections count for --exit-idle-time."""
    with run_proxy(
        ["-w", "1", "--exit-idle-time=1s", echo_target], workdir, listeners=LISTENERS, names=NAMES
    ) as proxy:
        scrapes = 0
        while proxy.process.poll() is None:
            try:
                status, _, _ = fetch(metrics_at(proxy), "/metrics")
            except OSError:  # the master closed the socket as it stopped
                break
            assert status == 200
            scrapes += 1
            time.sleep(0.1)  # the scenario: a scrape every 100 ms, ten per idle time
        assert proxy.wait(10) == 0
    assert scrapes >= 2
    assert "stopping: no connections for 1s" in proxy.stderr()
