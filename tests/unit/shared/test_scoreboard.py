"""Scoreboard slots shared with forked workers, and counters that never go backwards."""

import os

from forkproxy.shared.scoreboard import (
    ACCEPTED,
    ACTIVE,
    BYTES_TO_CLIENT,
    CONNECT_DURATION_BOUNDS,
    CONNECT_DURATION_BUCKETS,
    STATE,
    Scoreboard,
    SlotState,
)


def test_a_forked_writer_is_seen_by_the_parent() -> None:
    board = Scoreboard(4)
    board.prepare(2, generation=1, started_ns=5)
    assert board.get(2, STATE) == SlotState.STARTING
    pid = os.fork()
    if pid == 0:
        slot = board.slot(2)
        slot[ACCEPTED] += 7
        slot[BYTES_TO_CLIENT] += 1 << 40
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.get(2, ACCEPTED) == 7
    assert board.get(2, BYTES_TO_CLIENT) == 1 << 40
    assert board.get(1, ACCEPTED) == 0
    board.close()


def test_retire_keeps_counters_and_frees_the_slot() -> None:
    board = Scoreboard(2)
    board.prepare(0, 0, 0)
    slot = board.slot(0)
    slot[ACCEPTED] = 10
    slot[ACTIVE] = 3
    board.retire(0)
    assert board.get(0, ACCEPTED) == 0 and board.get(0, ACTIVE) == 0
    assert board.get(0, STATE) == SlotState.FREE
    assert board.counter(0, ACCEPTED) == 10
    board.prepare(0, 1, 0)
    board.slot(0)[ACCEPTED] += 2
    assert board.counter(0, ACCEPTED) == 12
    assert board.total(ACCEPTED) == 12
    board.close()


def test_histogram_is_cumulative_with_inf_last() -> None:
    board = Scoreboard(2)
    board.slot(0)[CONNECT_DURATION_BUCKETS + 0] = 2
    board.slot(1)[CONNECT_DURATION_BUCKETS + 3] = 1
    board.slot(1)[CONNECT_DURATION_BUCKETS + len(CONNECT_DURATION_BOUNDS)] = 4  # +Inf
    buckets, _ = board.histogram(CONNECT_DURATION_BUCKETS, CONNECT_DURATION_BOUNDS)
    assert len(buckets) == len(CONNECT_DURATION_BOUNDS) + 1
    assert buckets[0] == 2 and buckets[3] == 3 and buckets[-1] == 7
    board.close()
