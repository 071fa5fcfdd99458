"""Per-target and per-listener metrics, /healthz and STATUS= from the target table and the
workers' rows: what a scrape shows for rows a (forked) worker wrote, a target down or
cooling down, listeners of one name, and promtool's opinion of it all."""

import os
import selectors
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from forkproxy.settings.address import parse_target
from forkproxy.settings.config import Config, ListenerSettings
from forkproxy.shared.layout import (
    L_CONNECTIONS,
    L_REFUSED,
    LISTENER_REFUSALS,
    T_ACTIVE,
    T_BYTES_TO_TARGET,
    T_CONNECT_ERRORS,
    T_CONNECTIONS,
)
from forkproxy.shared.listener import Listener
from forkproxy.shared.scoreboard import STATE, SlotState
from forkproxy.shared.targets_table import connect_error_reason
from forkproxy.supervisor.health import Checker
from forkproxy.supervisor.metrics.collector import ScoreboardCollector, make_registry
from forkproxy.supervisor.target_rows import TargetRows, pair_problems
from tests.support.shared_memory import Shared, make_shared

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class _Worker:
    slot: int
    generation: int = 0
    stopping: bool = False
    killed: bool = False


@dataclass
class _Master:
    listeners: tuple[Listener, ...]
    workers: dict[int, _Worker] = field(default_factory=dict)
    generation: int = 0
    target_workers: int = 1
    restarts: int = 0
    stopping: bool = False
    heartbeat_interval: float = 1.0


@dataclass
class World:
    shared: Shared
    master: _Master
    rows: TargetRows
    checker: Checker

    def collector(self) -> ScoreboardCollector:
        board, admission = self.shared.scoreboard, self.shared.admission
        return ScoreboardCollector(self.master, board, admission, targets=self)

    def scrape(self) -> Samples:
        text = generate_latest(make_registry(self.collector())).decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def row(self, listener: str, target: str) -> int:
        return next(
            entry.row
            for entry in self.rows.entries
            if (entry.listener, entry.target.text) == (listener, target)
        )


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def world() -> Iterator[World]:
    """Listeners 'web' (two sockets of that name, as systemd passes them) and 'api', and
    an unnamed one with the global targets; one serving worker in slot 0."""
    shared = make_shared(16, slots=0)
    sockets = [socket.socket() for _ in range(4)]
    listeners = (
        Listener(sockets[0], "web", "fd 3 'web' (127.0.0.1:80)"),
        Listener(sockets[1], "web", "fd 4 'web' ([::1]:80)"),
        Listener(sockets[2], "api", "fd 5 'api' (127.0.0.1:81)"),
        Listener(sockets[3], "", "fd 6 (127.0.0.1:82)"),
    )
    web = ListenerSettings("web", (parse_target("10.0.0.1:80"), parse_target("10.0.0.2:80")))
    api = ListenerSettings("api", (parse_target("10.0.0.1:80"),), check_interval=1.0)
    config = Config(targets=(parse_target("/run/app.sock"),), listeners=(web, api))
    rows = TargetRows.set_up(config, listeners, shared.mapping, shared.scoreboard)
    selector = selectors.DefaultSelector()
    checker = Checker(selector, rows, shared.mapping)
    master = _Master(listeners)
    shared.scoreboard.prepare(0, 0, time.monotonic_ns())
    shared.scoreboard.slot(0)[STATE] = SlotState.SERVING
    master.workers[100] = _Worker(0)
    yield World(shared, master, rows, checker)
    checker.close()
    selector.close()
    rows.close()
    shared.close()
    for sock in sockets:
        sock.close()


def test_one_series_per_listener_name_and_target(world: World) -> None:
    samples = world.scrape()
    up = {
        labels: value for (name, labels), value in samples.items() if name == "forkproxy_target_up"
    }
    assert up == {
        (("listener", "web"), ("target", "10.0.0.1:80")): 1,
        (("listener", "web"), ("target", "10.0.0.2:80")): 1,
        (("listener", "api"), ("target", "10.0.0.1:80")): 1,
        (("listener", "fd 6 (127.0.0.1:82)"), ("target", "/run/app.sock")): 1,
    }
    assert world.rows.by_listener[0] == world.rows.by_listener[1]  # one name, one set of rows
    assert len({one.route for one in world.rows.by_listener}) == 3


def test_what_workers_write_is_what_a_scrape_shows(world: World) -> None:
    board = world.shared.scoreboard
    row = world.row("web", "10.0.0.2:80")
    pid = os.fork()
    if pid == 0:  # the worker's side of the contract
        target = board.target_row(0, row)
        target[T_CONNECTIONS] += 5
        target[T_ACTIVE] += 2
        target[T_BYTES_TO_TARGET] += 1000
        target[T_CONNECT_ERRORS + connect_error_reason(111)] += 3
        board.row(0, 0)[L_CONNECTIONS] += 4
        board.row(0, 1)[L_CONNECTIONS] += 3  # the other socket named web
        board.row(0, 1)[L_REFUSED + LISTENER_REFUSALS.index("no_target")] += 1
        os._exit(0)
    os.waitpid(pid, 0)
    labels = {"listener": "web", "target": "10.0.0.2:80"}
    samples = world.scrape()
    assert _value(samples, "forkproxy_target_connections_total", **labels) == 5
    assert _value(samples, "forkproxy_target_connections_active", **labels) == 2
    assert (
        _value(samples, "forkproxy_target_relayed_bytes_total", **labels, direction="to_target")
        == 1000
    )
    assert _value(samples, "forkproxy_target_connect_errors_total", **labels, reason="refused") == 3
    assert _value(samples, "forkproxy_target_connect_errors_total", **labels, reason="timeout") == 0
    assert _value(samples, "forkproxy_listener_connections_total", listener="web") == 7
    refused = "forkproxy_listener_connections_refused_total"
    assert _value(samples, refused, listener="web", reason="no_target") == 1
    assert _value(samples, refused, listener="api", reason="cap") == 0
    board.retire(0)  # the worker is reaped: counters stay, the gauge goes
    samples = world.scrape()
    assert _value(samples, "forkproxy_target_connections_total", **labels) == 5
    assert _value(samples, "forkproxy_target_connections_active", **labels) == 0
    assert _value(samples, "forkproxy_listener_connections_total", listener="web") == 7


def test_up_is_0_while_cooling_down_or_checked_down(world: World) -> None:
    table = world.rows.table
    cooling = world.row("web", "10.0.0.1:80")
    table.mark_failed(cooling, time.monotonic_ns() + 60_000_000_000)
    down = world.row("api", "10.0.0.1:80")
    table.set_up(down, False, time.monotonic_ns())
    samples = world.scrape()
    assert _value(samples, "forkproxy_target_up", listener="web", target="10.0.0.1:80") == 0
    assert _value(samples, "forkproxy_target_up", listener="web", target="10.0.0.2:80") == 1
    assert _value(samples, "forkproxy_target_up", listener="api", target="10.0.0.1:80") == 0
    table.mark_failed(cooling, time.monotonic_ns() - 1)  # the cool-down is over
    assert _value(world.scrape(), "forkproxy_target_up", listener="web", target="10.0.0.1:80") == 1


def test_healthz_fails_while_a_listener_has_no_target_up(world: World) -> None:
    collector = world.collector()
    assert collector.health() == (True, "1 of 1 workers serving")
    table = world.rows.table
    table.set_up(world.row("api", "10.0.0.1:80"), False, time.monotonic_ns())
    assert collector.health() == (False, "listener 'api' has no target up (1 down)")
    table.mark_failed(world.row("fd 6 (127.0.0.1:82)", "/run/app.sock"), 1 << 62)
    assert collector.health() == (
        False,
        "listener 'api' has no target up (1 down), and 1 more listener",
    )
    healthy, text = collector.status()
    assert not healthy
    assert text.splitlines()[1:] == [
        "listener 'web': 2 of 2 targets up",
        "  10.0.0.1:80 up, 0 active",
        "  10.0.0.2:80 up, 0 active",
        "listener 'api': 0 of 1 targets up",
        "  10.0.0.1:80 DOWN, 0 active",
        "listener fd 6 (127.0.0.1:82): 0 of 1 targets up",
        text.splitlines()[-1],
    ]
    assert text.splitlines()[-1].startswith(
        "  /run/app.sock DOWN (cooling down for "
    ) and text.endswith("s after a failed connect), 0 active")
    world.master.stopping = True
    assert collector.health() == (False, "stopping")  # stopping says more


def test_the_check_histogram_only_with_checks(world: World) -> None:
    samples = world.scrape()
    assert _value(samples, "forkproxy_target_check_duration_seconds_count") == 0
    world.checker.targets.clear()  # as with no --check-interval anywhere
    assert not any(name.startswith("forkproxy_target_check") for name, _ in world.scrape())


def test_promtool_takes_the_target_families(world: World) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (apt-get install prometheus) and $CI is set")
        pytest.skip("promtool is missing (Debian package prometheus)")
    text = generate_latest(make_registry(world.collector()))
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, b"")


def test_the_pairs_must_fit_the_table() -> None:
    targets = tuple(parse_target(f"10.0.{n // 250}.{n % 250}:80") for n in range(200))
    config = Config(targets=targets)
    assert pair_problems(config, ["a"]) == []
    assert pair_problems(config, ["a", "a"]) == []  # one name: the same pairs
    assert pair_problems(config, ["a", "b"]) == [
        "too many targets: the listeners have 400 (listener, target) pairs, and forkproxy "
        "keeps health and metrics for at most 256"
    ]
