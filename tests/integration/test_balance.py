"""Which target each client goes to, against three real nginx targets and 4 workers: a
target the checks find down gets no client until it is back, with no client request
failing meanwhile; --balance least-connections, source and round-robin across workers;
--backup only while no other target is usable; --connect-retry waiting for a target
that starts late; per-target totals adding up to the global ones; promtool clean."""

import os
import shutil
import signal
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.test_health_checks import fetch, samples
from tests.support.nginx import Nginx, NginxFactory, read_to_eof
from tests.support.proxy import Proxy, run_proxy, wait_until

# Passed by the harness: the proxied socket, named web, then the metrics socket.
LISTENERS = ("tcp", "tcp")
NAMES = ("web", "metrics")
WORKERS = ["-w", "4"]
CHECKS = ["--check-interval", "200ms", "--check-fall", "2"]
DEADLINE = 30.0  # seconds: generous; what is waited for takes well under a second
REQUEST = b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _target(nginx: Nginx) -> str:
    return f"127.0.0.1:{nginx.port}"


def _servers(nginx_factory: NginxFactory, count: int = 3) -> list[Nginx]:
    """nginx servers whose body names them: b"target 0\\n", ..."""
    return [nginx_factory(body=f"target {n}\n".encode()) for n in range(count)]


def _request(proxy: Proxy, source: str | None = None) -> bytes:
    """One HTTP/1.0 request through the proxy: the body of a 200 response."""
    sock = socket.socket()
    try:
        sock.settimeout(10)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(proxy.address(0))  # type: ignore[arg-type]
        sock.sendall(REQUEST)
        response = read_to_eof(sock)
    finally:
        sock.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), response
    return body


def _value(scrape: Samples, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def _per_target(scrape: Samples, name: str, target: str, **labels: str) -> float:
    return _value(scrape, name, listener="web", target=target, **labels)


def _summed(scrape: Samples, name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(
        value for (sample, keys), value in scrape.items() if sample == name and wanted <= set(keys)
    )


def _stop_gracefully(nginx: Nginx) -> None:
    """SIGQUIT: nginx closes its listener and finishes the requests it has, so no client
    request that reached it is cut short (SIGTERM would close them at once)."""
    os.kill(nginx.pid, signal.SIGQUIT)
    nginx.process.wait(DEADLINE)


def _checked_down(proxy: Proxy, target: str) -> bool:
    return f"target '{target}' of listener 'web' is down" in proxy.stderr()


class _Load:
    """Client requests in a loop on `threads` threads until stopped: each one's body or
    the error it met."""

    def __init__(self, proxy: Proxy, threads: int = 2) -> None:
        self.proxy = proxy
        self.stopping = threading.Event()
        self.going = threading.Event()  # cleared: no new request starts
        self.going.set()
        self.in_flight = 0
        self.lock = threading.Lock()
        self.bodies: list[bytes] = []
        self.failures: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.going.wait()
            with self.lock:
                self.in_flight += 1
            try:
                body = _request(self.proxy)
            except (OSError, AssertionError) as error:
                with self.lock:
                    self.failures.append(error)
                continue
            else:
                with self.lock:
                    self.bodies.append(body)
            finally:
                with self.lock:
                    self.in_flight -= 1

    @contextmanager
    def between_requests(self) -> Iterator[None]:
        """No request under way for the block: nginx, stopping, closes the connections it
        has accepted but not read yet and the kernel resets those in its backlog, which
        no proxy can save (the request's bytes are the target's already)."""
        self.going.clear()
        try:
            wait_until(lambda: self.in_flight == 0, DEADLINE, "the requests under way")
            yield
        finally:
            self.going.set()

    def done(self) -> int:
        with self.lock:
            return len(self.bodies) + len(self.failures)

    def wait_for_more(self, count: int) -> None:
        goal = self.done() + count
        wait_until(lambda: self.done() >= goal, DEADLINE, f"{count} more requests")


@contextmanager
def _load(proxy: Proxy) -> Iterator[_Load]:
    load = _Load(proxy)
    for thread in load.threads:
        thread.start()
    try:
        yield load
    finally:
        load.stopping.set()
        for thread in load.threads:
            thread.join(DEADLINE)


def test_a_target_down_gets_no_client_until_it_is_back_and_no_request_fails(
    nginx_factory: NginxFactory, workdir: Path
) -> None:
    servers = _servers(nginx_factory)
    targets = [_target(one) for one in servers]
    down = targets[1]
    port = servers[1].port
    with run_proxy([*WORKERS, *CHECKS, *targets], workdir, LISTENERS, NAMES) as proxy:
        with _load(proxy) as load:
            load.wait_for_more(60)
            with load.between_requests():
                _stop_gracefully(servers[1])
            wait_until(lambda: _checked_down(proxy, down), DEADLINE, "the checks find it down")
            wait_until(
                lambda: _per_target(samples(proxy), "forkproxy_target_up", down) == 0,
                DEADLINE,
                "forkproxy_target_up 0",
            )
            before = samples(proxy)
            load.wait_for_more(200)
            after = samples(proxy)
            # Not one attempt to it while the checks have it down, connected or refused.
            for name in (
                "forkproxy_target_connections_total",
                "forkproxy_target_connect_errors_total",
            ):
                assert _summed(after, name, target=down) == _summed(before, name, target=down)
            assert _summed(after, "forkproxy_target_connections_total") > _summed(
                before, "forkproxy_target_connections_total"
            )
            nginx_factory(f"127.0.0.1:{port}", body=b"target 1\n")
            wait_until(
                lambda: _per_target(samples(proxy), "forkproxy_target_up", down) == 1,
                DEADLINE,
                "the restarted target up",
            )
            back = len([body for body in load.bodies if body == b"target 1\n"])
            wait_until(
                lambda: load.bodies.count(b"target 1\n") > back, DEADLINE, "clients to it again"
            )
            load.wait_for_more(60)
        assert load.failures == [], proxy.stderr()
        assert set(load.bodies) == {b"target 0\n", b"target 1\n", b"target 2\n"}
        _assert_totals_add_up(samples(proxy))


def test_an_http_check_answered_503_keeps_clients_off_although_tcp_connects(
    nginx_factory: NginxFactory, workdir: Path
) -> None:
    sick = nginx_factory(body=b"sick\n", statuses={"/health": 503})
    well = _servers(nginx_factory, 2)
    targets = [_target(sick), *(_target(one) for one in well)]
    args = [*WORKERS, *CHECKS, "--check-http", "/health", *targets]
    with run_proxy(args, workdir, LISTENERS, NAMES) as proxy:
        wait_until(lambda: _checked_down(proxy, targets[0]), DEADLINE, "the 503 target down")
        bodies = [_request(proxy) for _ in range(30)]
        assert set(bodies) == {b"target 0\n", b"target 1\n"}
        assert _per_target(samples(proxy), "forkproxy_target_up", targets[0]) == 0
    requests = {entry.request for entry in sick.access_log_entries()}
    assert requests == {"GET /health HTTP/1.1"}  # checks only, never a client


def test_least_connections_sends_new_clients_past_a_busy_target(
    nginx_factory: NginxFactory, workdir: Path
) -> None:
    servers = _servers(nginx_factory)
    targets = [_target(one) for one in servers]
    ports = [one.port for one in servers]
    for idle in servers[1:]:
        _stop_gracefully(idle)
    args = [*WORKERS, *CHECKS, "--balance", "least-connections", *targets]
    with run_proxy(args, workdir, LISTENERS, NAMES) as proxy:
        wait_until(
            lambda: all(_checked_down(proxy, target) for target in targets[1:]),
            DEADLINE,
            "the other two down",
        )
        # 20 long connections, all to the one target up: half a request, nginx waits.
        long = [proxy.connect(timeout=10) for _ in range(20)]
        try:
            for sock in long:
                sock.sendall(b"GET / HTTP/1.1\r\n")
            busy = "forkproxy_target_connections_active"
            wait_until(
                lambda: _per_target(samples(proxy), busy, targets[0]) == 20,
                DEADLINE,
                "20 connections open to the first target",
            )
            for n in (1, 2):
                nginx_factory(f"127.0.0.1:{ports[n]}", body=f"target {n}\n".encode())
            up = "forkproxy_target_up"
            wait_until(
                lambda: all(_per_target(samples(proxy), up, t) == 1 for t in targets[1:]),
                DEADLINE,
                "the other two up",
            )
            short = Counter(_request(proxy) for _ in range(10))
            assert short[b"target 0\n"] == 0, short
            assert short[b"target 1\n"] + short[b"target 2\n"] == 10
            scrape = samples(proxy)
            assert _per_target(scrape, busy, targets[0]) == 20
            total = "forkproxy_target_connections_total"
            assert _per_target(scrape, total, targets[0]) == 20
        finally:
            for sock in long:
                sock.close()


def test_source_keeps_a_client_address_on_one_target(
    nginx_factory: NginxFactory, workdir: Path
) -> None:
    servers = _servers(nginx_factory)
    args = [*WORKERS, "--balance", "source", *(_target(one) for one in servers)]
    with run_proxy(args, workdir, LISTENERS, NAMES) as proxy:
        bodies = Counter(_request(proxy) for _ in range(100))
        assert len(bodies) == 1, bodies
        # Other client addresses spread over the targets, each kept too.
        by_source = {f"127.0.0.{n}": _request(proxy, f"127.0.0.{n}") for n in range(2, 32)}
        assert len(set(by_source.values())) > 1
        for source, body in list(by_source.items())[:5]:
            assert {_request(proxy, source) for _ in range(5)} == {body}


def test_round_robin_spreads_evenly_across_workers_and_totals_add_up(
    nginx_factory: NginxFactory, workdir: Path
) -> None:
    servers = _servers(nginx_factory)
    targets = [_target(one) for one in servers]
    with run_proxy([*WORKERS, *targets], workdir, LISTENERS, NAMES) as proxy:
        bodies = Counter(_request(proxy) for _ in range(400))
        share = 400 / 3
        for n in range(3):
            assert abs(bodies[f"target {n}\n".encode()] - share) <= 0.05 * share, bodies
        scrape = samples(proxy)
        for n, target in enumerate(targets):
            count = _per_target(scrape, "forkproxy_target_connections_total", target)
            assert count == bodies[f"target {n}\n".encode()]
        _assert_totals_add_up(scrape)
        _promtool_check(proxy)


def test_a_backup_is_used_only_while_no_other_target_is_usable(
    nginx_factory: NginxFactory, workdir: Path
) -> None:
    main, spare = nginx_factory(body=b"main\n"), nginx_factory(body=b"backup\n")
    port = main.port
    args = [*WORKERS, *CHECKS, _target(main), "--backup", _target(spare)]
    with run_proxy(args, workdir, LISTENERS, NAMES) as proxy:
        assert {_request(proxy) for _ in range(20)} == {b"main\n"}
        _stop_gracefully(main)
        assert {_request(proxy) for _ in range(20)} == {b"backup\n"}
        nginx_factory(f"127.0.0.1:{port}", body=b"main\n")
        wait_until(
            lambda: _per_target(samples(proxy), "forkproxy_target_up", _target(main)) == 1,
            DEADLINE,
            "the target up again",
        )
        assert {_request(proxy) for _ in range(20)} == {b"main\n"}
        scrape = samples(proxy)
        # The backup has its row: checked, counted.
        assert _per_target(scrape, "forkproxy_target_up", _target(spare)) == 1
        assert _per_target(scrape, "forkproxy_target_connections_total", _target(spare)) == 20
        _assert_totals_add_up(scrape)


def test_connect_retry_waits_for_a_target_that_starts_late(
    nginx_factory: NginxFactory, workdir: Path
) -> None:
    late = nginx_factory()
    port = late.port
    _stop_gracefully(late)
    target = f"127.0.0.1:{port}"
    with run_proxy([*WORKERS, "--connect-retry", "5s", target], workdir, LISTENERS, NAMES) as proxy:
        with proxy.connect(timeout=10) as client:
            client.sendall(REQUEST)  # sent before the target listens: kept, not lost
            refused = _refusals(proxy, target)
            wait_until(lambda: refused() >= 1, DEADLINE, "a refused attempt")
            started = nginx_factory(f"127.0.0.1:{port}")
            response = read_to_eof(client)
        assert response.startswith(b"HTTP/1.1 200 ")
        assert response.endswith(b"hello from nginx\n")
        (entry,) = started.access_log_entries()
        assert (entry.request, entry.status) == ("GET / HTTP/1.0", 200)
        scrape = samples(proxy)
        assert (
            _value(
                scrape,
                "forkproxy_listener_connections_refused_total",
                listener="web",
                reason="no_target",
            )
            == 0
        )
        _assert_totals_add_up(scrape)


def test_without_connect_retry_a_refused_client_is_closed_at_once(
    nginx_factory: NginxFactory, workdir: Path
) -> None:
    gone = nginx_factory()
    target = _target(gone)
    _stop_gracefully(gone)
    with run_proxy([*WORKERS, target], workdir, LISTENERS, NAMES) as proxy:
        with proxy.connect(timeout=10) as client:
            client.sendall(REQUEST)
            assert read_to_eof(client) == b""
        scrape = samples(proxy)
        refused = "forkproxy_listener_connections_refused_total"
        assert _value(scrape, refused, listener="web", reason="no_target") == 1
        errors = "forkproxy_target_connect_errors_total"
        assert _per_target(scrape, errors, target, reason="refused") == 1
        assert _summed(scrape, errors) == 1


def _refusals(proxy: Proxy, target: str) -> Callable[[], float]:
    def count() -> float:
        name = "forkproxy_target_connect_errors_total"
        return _per_target(samples(proxy), name, target, reason="refused")

    return count


def _assert_totals_add_up(scrape: Samples) -> None:
    """The per-target and per-listener series sum to the global ones."""
    pairs = [
        ("forkproxy_target_connections_total", "forkproxy_connections_accepted_total", {}),
        ("forkproxy_target_connect_errors_total", "forkproxy_backend_connect_errors_total", {}),
        ("forkproxy_listener_connections_total", "forkproxy_connections_accepted_total", {}),
    ]
    for part, whole, labels in pairs:
        assert _summed(scrape, part, **labels) == _value(scrape, whole), (part, whole)
    for direction in ("to_target", "to_client"):
        relayed = "forkproxy_target_relayed_bytes_total"
        assert _summed(scrape, relayed, direction=direction) == _value(
            scrape, "forkproxy_relayed_bytes_total", direction=direction
        )


def _promtool_check(proxy: Proxy) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (apt-get install prometheus) and $CI is set")
        return
    status, body = fetch(proxy, "/metrics")
    assert status == 200
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body.encode(), capture_output=True, timeout=30
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, b"")
