"""The target table: rows stable by (listener, target) across re-assignments on the same
mapping (what a re-executed master does), bounded, and health words a forked worker and
the master see alike."""

import errno
import os
import time
from collections.abc import Iterator

import pytest

from forkproxy.settings.address import parse_target
from forkproxy.shared.layout import CONNECT_ERROR_REASONS, MAX_ROUTES, MAX_TARGETS, T_CONNECTIONS
from forkproxy.shared.mapping import SharedMapping
from forkproxy.shared.targets_table import (
    CheckReason,
    TargetTable,
    TargetTableFull,
    connect_error_reason,
    listener_targets,
    row_key_hash,
)
from tests.support.shared_memory import Shared, make_shared


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


def test_each_pair_gets_its_own_row_and_fresh_rows_are_up(table: TargetTable) -> None:
    keys = [("web", "10.0.0.1:80"), ("web", "10.0.0.2:80"), ("api", "10.0.0.1:80")]
    assignment = table.assign(keys + [keys[0]])  # a repeated pair is one pair
    assert sorted(assignment.rows.values()) == [0, 1, 2]
    assert assignment.fresh == {0, 1, 2} and assignment.reused == frozenset()
    now = time.monotonic_ns()
    for row in assignment.rows.values():
        assert table.is_up(row) and table.usable(row, now)
        assert table.check_state(row) == (0, CheckReason.PASSED, 0, 0, 0)
    assert table.high_water() == 3


def test_a_reload_keeps_rows_and_health_by_pair(shared: Shared, table: TargetTable) -> None:
    first = table.assign([("web", "a:1"), ("web", "b:1"), ("web", "c:1")]).rows
    table.set_up(first[("web", "b:1")], False, 5)
    table.mark_failed(first[("web", "c:1")], 1 << 62)
    # The new image maps the same memfd and assigns the new settings' pairs: b stays,
    # a goes, d comes.
    adopted = SharedMapping.adopt(os.dup(shared.mapping.fd))
    again = TargetTable(adopted)
    try:
        assignment = again.assign([("web", "d:1"), ("web", "b:1"), ("web", "c:1")])
        rows = assignment.rows
        assert rows[("web", "b:1")] == first[("web", "b:1")]
        assert rows[("web", "c:1")] == first[("web", "c:1")]
        assert not again.is_up(rows[("web", "b:1")])  # its health came along
        assert not again.usable(rows[("web", "c:1")], time.monotonic_ns())
        # d takes a row never used, not a's (whose workers may still be draining).
        assert rows[("web", "d:1")] == 3
        assert assignment.fresh == {3} and assignment.reused == frozenset()
    finally:
        again.close()
        adopted.close()


def test_released_rows_are_taken_last_and_said_reused(table: TargetTable) -> None:
    keys = [("l", f"t{index}:1") for index in range(MAX_TARGETS)]
    table.assign(keys)
    table.set_up(0, False, 1)
    assignment = table.assign(keys[1:] + [("l", "new:1")])
    assert assignment.rows[("l", "new:1")] == 0
    assert assignment.reused == {0} and assignment.fresh == {0}
    assert table.is_up(0)  # reset for its new pair


def test_more_pairs_than_rows_is_an_error(table: TargetTable) -> None:
    keys = [("l", f"t{index}:1") for index in range(MAX_TARGETS + 1)]
    with pytest.raises(TargetTableFull, match=f"{MAX_TARGETS + 1} .* at most {MAX_TARGETS}"):
        table.assign(keys)
    assert table.high_water() == 0  # nothing handed out


def test_a_failed_connect_in_a_forked_worker_cools_the_target_for_everyone(
    table: TargetTable,
) -> None:
    row = table.assign([("web", "10.0.0.1:80")]).rows[("web", "10.0.0.1:80")]
    until = time.monotonic_ns() + 5_000_000_000
    pid = os.fork()
    if pid == 0:
        table.mark_failed(row, until)
        os._exit(0)
    os.waitpid(pid, 0)
    assert table.cooldown_until(row) == until
    assert not table.usable(row, until - 1)
    assert table.usable(row, until)
    table.clear_cooldown(row)
    assert table.cooldown_until(row) == 0 and table.usable(row, 0)


def test_down_is_unusable_and_the_checker_fields_are_kept(table: TargetTable) -> None:
    row = table.assign([("web", "10.0.0.1:80")]).rows[("web", "10.0.0.1:80")]
    table.set_up(row, False, 42)
    table.record_check(row, -3, CheckReason.HTTP_STATUS, 503, 43)
    assert not table.usable(row, time.monotonic_ns())
    assert table.check_state(row) == (-3, CheckReason.HTTP_STATUS, 503, 43, 42)
    table.set_up(row, False, 99)  # no change: CHANGED_NS stays
    assert table.check_state(row)[4] == 42
    table.forget_checks(row)
    assert table.is_up(row) and table.check_state(row)[:4] == (0, CheckReason.PASSED, 0, 0)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.ECONNREFUSED, "refused"),
        (errno.ENOENT, "refused"),
        (errno.ETIMEDOUT, "timeout"),
        (errno.EHOSTUNREACH, "unreachable"),
        (errno.ENETUNREACH, "unreachable"),
        (errno.ECONNRESET, "other"),
        (errno.EINVAL, "other"),
        (None, "other"),
    ],
)
def test_connect_error_reasons(code: int | None, reason: str) -> None:
    assert CONNECT_ERROR_REASONS[connect_error_reason(code)] == reason


def test_listeners_of_one_name_share_rows_and_round_robin_word() -> None:
    a, b = parse_target("10.0.0.1:80"), parse_target("10.0.0.2:80")
    rows = {("web", a.text): 4, ("web", b.text): 7, ("api", a.text): 9}
    result = listener_targets(["web", "api", "web"], [(a, b), (a,), (a, b)], rows)
    assert [one.rows for one in result] == [(4, 7), (9,), (4, 7)]
    assert [one.route for one in result] == [0, 1, 0]
    names = [f"l{index}" for index in range(MAX_ROUTES + 1)]
    many = listener_targets(names, [(a,)] * len(names), {(name, a.text): 0 for name in names})
    assert many[-1].route == 0  # more routes than words: they share (a skewed rotation)


def test_keys_hash_apart_and_never_to_zero() -> None:
    hashes = {row_key_hash(("l", f"t{index}")) for index in range(10000)}
    assert len(hashes) == 10000 and 0 not in hashes
    assert row_key_hash(("a", "b:1")) != row_key_hash(("a\0b", ":1"))


def test_target_rows_fold_on_reap_and_a_reused_row_forgets(shared: Shared) -> None:
    board = shared.scoreboard
    board.target_rows = 2
    board.target_row(0, 1)[T_CONNECTIONS] += 3
    board.target_row(1, 1)[T_CONNECTIONS] += 4
    board.target_row(1, 0)[T_CONNECTIONS] += 9
    assert board.target_total(1, T_CONNECTIONS) == 7
    board.retire(0)
    assert board.target_total(1, T_CONNECTIONS) == 7
    assert board.target_row(0, 1).tolist() == [0] * len(board.target_row(0, 1))
    board.forget_target_totals(1)
    assert board.target_total(1, T_CONNECTIONS) == 4  # the live worker's own
    assert board.target_total(0, T_CONNECTIONS) == 9
