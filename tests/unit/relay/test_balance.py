"""Picking targets by the shared target table: each --balance mode, backups, targets the
checks or a cool-down took out, counts in the worker's rows, and --connect-retry rounds
against a real unix socket that appears late."""

import asyncio
import errno
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkproxy.relay.balance import (
    FIRST,
    LEAST_CONNECTIONS,
    ROUND_ROBIN,
    SOURCE,
    Balancer,
    source_score,
    target_salt,
)
from forkproxy.relay.poller import Poller
from forkproxy.settings.address import parse_target
from forkproxy.shared.layout import (
    CONNECT_ERROR_REASONS,
    CONNECT_ERRORS,
    T_ACTIVE,
    T_CONNECT_ERRORS,
)
from forkproxy.shared.per_source import source_key
from forkproxy.shared.targets_table import TargetTable
from tests.support.shared_memory import Shared, make_shared

TEXTS = ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
REFUSED = T_CONNECT_ERRORS + CONNECT_ERROR_REASONS.index("refused")


@pytest.fixture
def shared() -> Iterator[Shared]:
    made = make_shared(8, slots=2)
    yield made
    made.close()


@pytest.fixture
def table(shared: Shared) -> Iterator[TargetTable]:
    made = TargetTable(shared.mapping)
    yield made
    made.close()


def _balancer(
    shared: Shared,
    table: TargetTable,
    mode: str = ROUND_ROBIN,
    texts: tuple[str, ...] = TEXTS,
    backups: tuple[str, ...] = (),
    slot: int = 0,
    retry: float = 0.0,
) -> Balancer:
    keys = [("web", text) for text in (*texts, *backups)]
    rows = table.assign(keys).rows
    shared.scoreboard.target_rows = table.high_water()
    return Balancer(
        [parse_target(text) for text in texts],
        [parse_target(text) for text in backups],
        [rows[key] for key in keys],
        0,
        table,
        shared.scoreboard,
        slot,
        mode,
        retry=retry,
    )


def test_round_robin_turns_one_counter_for_every_worker(shared: Shared, table: TargetTable) -> None:
    workers = [_balancer(shared, table, slot=slot) for slot in (0, 1)]
    firsts = [workers[n % 2].order()[0] for n in range(9)]
    assert firsts == [0, 1, 2] * 3  # two workers, one rotation


def test_a_target_down_or_cooling_is_skipped_then_tried_last(
    shared: Shared, table: TargetTable
) -> None:
    balancer = _balancer(shared, table, FIRST)
    table.set_up(balancer.rows[0], False, time.monotonic_ns())  # the checks: down
    balancer.failed(1, OSError(errno.ECONNREFUSED, "refused"))  # a worker: cooling down
    assert balancer.order() == [2, 1]  # down: never; cooling: after the usable ones
    assert shared.scoreboard.target_row(0, balancer.rows[1])[REFUSED] == 1
    assert shared.scoreboard.slot(0)[CONNECT_ERRORS] == 1
    other_worker = _balancer(shared, table, FIRST, slot=1)
    assert other_worker.order() == [2, 1]  # the same table
    balancer.succeeded(1)
    assert other_worker.order() == [1, 2]


def test_least_connections_counts_every_workers_connections(
    shared: Shared, table: TargetTable
) -> None:
    balancer = _balancer(shared, table, LEAST_CONNECTIONS)
    board = shared.scoreboard
    board.target_row(1, balancer.rows[0])[T_ACTIVE] = 5  # another worker's
    board.target_row(0, balancer.rows[1])[T_ACTIVE] = 2
    board.target_row(1, balancer.rows[1])[T_ACTIVE] = 2
    board.target_row(0, balancer.rows[2])[T_ACTIVE] = 3
    assert [balancer.order()[0] for _ in range(4)] == [2, 2, 2, 2]
    board.target_row(0, balancer.rows[2])[T_ACTIVE] = 4
    picks = [balancer.order()[0] for _ in range(4)]
    assert sorted(picks) == [1, 1, 2, 2] and picks[0] != picks[1], picks  # ties: in turn


def test_source_keeps_a_client_while_its_target_is_usable(
    shared: Shared, table: TargetTable
) -> None:
    balancer = _balancer(shared, table, SOURCE)
    keys = [source_key(socket.AF_INET, (f"192.0.2.{n}", 1)) or b"" for n in range(1, 61)]
    firsts = {key: balancer.order(key)[0] for key in keys}
    assert {balancer.order(key)[0] for key in keys[:1] for _ in range(10)} == {firsts[keys[0]]}
    spread = Counter(firsts.values())
    assert len(spread) == 3 and min(spread.values()) >= 10, spread
    gone = firsts[keys[0]]
    table.set_up(balancer.rows[gone], False, time.monotonic_ns())
    moved = {key: balancer.order(key)[0] for key in keys}
    # Only the clients of the target gone move; each to its second choice.
    assert all(moved[key] == firsts[key] for key in keys if firsts[key] != gone)
    assert all(moved[key] != gone for key in keys)
    salts = [target_salt(parse_target(text)) for text in TEXTS]
    second = sorted(range(3), key=lambda i: source_score(keys[0], salts[i]), reverse=True)[1]
    assert moved[keys[0]] == second


def test_backups_only_when_no_other_target_is_usable(shared: Shared, table: TargetTable) -> None:
    balancer = _balancer(shared, table, ROUND_ROBIN, TEXTS[:2], ("10.0.0.9:80", "10.0.0.8:80"))
    assert sorted(balancer.order()[:2]) == [0, 1]
    assert balancer.order()[2:] == [2, 3]  # failover of this client: backups, in order
    now = time.monotonic_ns()
    table.set_up(balancer.rows[0], False, now)
    table.set_up(balancer.rows[1], False, now)
    assert balancer.order() == [2, 3]
    table.set_up(balancer.rows[2], False, now)
    assert balancer.order() == [3]


def test_connect_retry_waits_for_a_target_that_starts_listening(
    shared: Shared, table: TargetTable, tmp_path: Path
) -> None:
    path = str(tmp_path / "late.sock")
    balancer = _balancer(shared, table, FIRST, (path,), retry=5.0)
    loop = asyncio.new_event_loop()
    poller = Poller(loop, lambda fd, error: None)
    outcome: list[object] = []
    server = socket.socket(socket.AF_UNIX)
    try:

        def listen_late() -> None:
            server.bind(path)
            server.listen()

        def on_connected(sock: socket.socket, index: int) -> None:
            outcome.append(index)
            sock.close()
            loop.stop()

        def on_failed(error: OSError) -> None:
            outcome.append(error)
            loop.stop()

        balancer.connect(loop, poller, on_connected, on_failed)
        assert outcome == []  # refused (no socket file): kept for another round
        loop.call_later(0.2, listen_late)
        loop.run_forever()
        assert outcome == [0]
        refused = shared.scoreboard.target_row(0, balancer.rows[0])[REFUSED]
        assert refused >= 2  # 50 ms, 100 ms, ...: a few rounds before it listened
        assert shared.scoreboard.slot(0)[CONNECT_ERRORS] == refused
        assert table.usable(balancer.rows[0], time.monotonic_ns())  # the cool-down ended
    finally:
        server.close()
        poller.close()
        loop.close()


def test_without_connect_retry_a_refusal_fails_at_once(
    shared: Shared, table: TargetTable, tmp_path: Path
) -> None:
    balancer = _balancer(shared, table, FIRST, (str(tmp_path / "none.sock"),))
    loop = asyncio.new_event_loop()
    poller = Poller(loop, lambda fd, error: None)
    failures: list[OSError] = []
    try:
        balancer.connect(loop, poller, lambda sock, index: None, failures.append)
        assert [error.errno for error in failures] == [errno.ENOENT]
    finally:
        poller.close()
        loop.close()
