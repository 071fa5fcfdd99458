"""The Grafana dashboard and the Prometheus rules against the real thing: a real
Prometheus scrapes a real forkproxy that relays a steady client loop to a real target,
and evaluates every recording rule, panel query and template variable through its HTTP
API. Each must parse and return data; every rule must load and evaluate cleanly."""

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.monitoring import (
    ALERTS,
    RULES,
    Query,
    alerting_rules,
    all_queries,
    prometheus,
    recording_rules,
)
from tests.support.prometheus import PrometheusAPI, QueryError, run_prometheus
from tests.support.proxy import (
    Proxy,
    run_backend,
    run_cli,
    run_proxy,
    send_all_then_read,
    wait_until,
)

# Queries that return nothing today because the metrics they read are not served yet.
# Empty this list as those metrics land: the test fails for a query listed here that
# returns data, and for a name that is not one of the queries.
EXPECTED_MISSING: frozenset[str] = frozenset()

# Listeners passed by the harness: the proxied one, then the metrics endpoint.
LISTENERS = ("tcp", "tcp")
NAMES = ("web", "metrics")
PAYLOAD = bytes(range(256)) * 64  # 16 KiB each way per exchange
HELD = 2  # connections kept open through the test, so there is something active
CAP = 5  # --connections-max: HELD and the loop's one (and one being closed) fit under it


class ClientLoop:
    """Clients one after another through the proxy (each sends PAYLOAD, reads its echo,
    closes), in a thread, until stopped; and HELD connections kept open meanwhile. Before
    the loop starts, one client more than the cap is refused, so that the refusal
    counters have counted something."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.exchanges = 0
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="client loop")
        self.held: list[socket.socket] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                with self.proxy.connect() as client:
                    echo = send_all_then_read(client, PAYLOAD)
            except OSError as error:
                self.errors.append(repr(error))
            else:
                if echo == PAYLOAD:
                    self.exchanges += 1
                else:
                    self.errors.append(f"echo of {len(echo)} bytes, not {len(PAYLOAD)}")
            self.stopping.wait(0.005)  # a steady load, not a flood

    def admitted(self) -> socket.socket:
        client = self.proxy.connect()
        client.sendall(b"held")
        assert client.recv(4) == b"held"
        return client

    def refused(self) -> None:
        with self.proxy.connect() as client:
            try:
                assert client.recv(1) == b""  # closed at once, unanswered
            except ConnectionResetError:
                pass

    @contextlib.contextmanager
    def running(self) -> Iterator["ClientLoop"]:
        self.held = [self.admitted() for _ in range(HELD)]
        filling = [self.admitted() for _ in range(CAP - HELD)]
        self.refused()
        for client in filling:
            client.close()
        self.thread.start()
        try:
            yield self
        finally:
            self.stopping.set()
            self.thread.join(30)
            for client in self.held:
                client.close()


def later_options(directory: Path) -> list[str]:
    """Options that make forkproxy serve the metrics of health checks and of the access
    log, when this forkproxy has them (without them those metrics are missing, which
    EXPECTED_MISSING says)."""
    usage = run_cli(["--help"]).stdout
    options = []
    if "--check-interval" in usage:
        options += ["--check-interval", "1s"]
    if "--access-log" in usage:
        options += ["--access-log", str(directory / "access.log")]
    return options


@contextlib.contextmanager
def refusing_target(directory: Path) -> Iterator[str]:
    """A unix socket path that refuses connections (bound, not listening): a target
    that is down, so connect errors and failover happen under the load."""
    path = directory / "down.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        yield str(path)
    path.unlink()


def evaluate(api: PrometheusAPI, query: Query) -> list[dict[str, Any]]:
    """The series `query` returns now (for a variable: those with its label set)."""
    try:
        result = api.query(query.expr)
    except QueryError as error:
        raise AssertionError(f"{query.name}: {query.expr!r}: {error}") from None
    if query.label is not None:
        result = [series for series in result if series["metric"].get(query.label)]
    return result


def wait_for_data(api: PrometheusAPI, queries: list[Query], timeout: float) -> None:
    """Until every query returns data; fail naming those that still do not."""
    deadline = time.monotonic() + timeout
    pending = list(queries)
    while True:
        pending = [query for query in pending if not evaluate(api, query)]
        if not pending:
            return
        if time.monotonic() > deadline:
            names = "\n".join(f"  {query.name}: {query.expr}" for query in pending)
            raise AssertionError(f"no data after {timeout}s from:\n{names}")
        time.sleep(0.5)  # the next scrape and rule evaluation are a second apart


def rules_evaluated(api: PrometheusAPI) -> bool:
    return all(rule["health"] != "unknown" for rule in api.rules().values())


def test_expected_missing_names_real_queries() -> None:
    names = {query.name for query in all_queries()}
    unknown = EXPECTED_MISSING - names
    assert not unknown, sorted(unknown)


@pytest.mark.timeout(240)
def test_every_rule_panel_and_variable_returns_data(workdir: Path) -> None:
    binary = prometheus()
    queries = all_queries()
    expected = [query for query in queries if query.name not in EXPECTED_MISSING]
    missing = [query for query in queries if query.name in EXPECTED_MISSING]
    with (
        run_backend("echo") as target,
        refusing_target(workdir) as down,
        run_proxy(
            ["-w", "2", "-c", str(CAP), *later_options(workdir), target.target, down],
            workdir,
            listeners=LISTENERS,
            names=NAMES,
        ) as proxy,
        ClientLoop(proxy).running() as load,
    ):
        host, port = proxy.address(1)[:2]  # type: ignore[index]
        with run_prometheus(binary, [f"{host}:{port}"], [RULES, ALERTS]) as api:
            wait_for_data(api, expected, timeout=90)

            # Every rule of both files loaded, and each evaluates without error.
            wait_until(lambda: rules_evaluated(api), 30, "every rule to be evaluated")
            loaded = api.rules()
            names = [rule["record"] for rule in recording_rules()]
            names += [rule["alert"] for rule in alerting_rules()]
            assert sorted(loaded) == sorted(names)
            unhealthy = {
                name: rule.get("lastError")
                for name, rule in loaded.items()
                if rule["health"] != "ok"
            }
            assert not unhealthy

            # The expected-missing queries do parse, and still return nothing.
            now_present = [query.name for query in missing if evaluate(api, query)]
            assert not now_present, (
                f"these return data now, remove them from EXPECTED_MISSING: {now_present}"
            )
    assert load.exchanges > 0, load.errors[:5]
