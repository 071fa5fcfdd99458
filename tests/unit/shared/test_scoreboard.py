"""Scoreboard slots shared with forked workers, and counters that never go backwards, not
even across a re-executed master (the retired totals live in the mapping too)."""

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from forkproxy.shared.layout import DG_SESSIONS, DG_SESSIONS_ACTIVE, SLOT_HIGH_WATER
from forkproxy.shared.mapping import LayoutMismatch, SharedMapping
from forkproxy.shared.scoreboard import (
    ACCEPTED,
    ACTIVE,
    BYTES_TO_CLIENT,
    CONNECT_DURATION_BOUNDS,
    CONNECT_DURATION_BUCKETS,
    STATE,
    SlotState,
)
from tests.support.shared_memory import Shared, make_shared


@pytest.fixture
def shared() -> Iterator[Shared]:
    made = make_shared(8, slots=0)
    yield made
    made.close()


def test_a_forked_writer_is_seen_by_the_parent(shared: Shared) -> None:
    board = shared.scoreboard
    board.prepare(2, generation=1, started_ns=5)
    assert board.get(2, STATE) == SlotState.STARTING
    assert board.high_water() == 3  # slots 0-2 count from now on
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


def test_retire_keeps_counters_and_frees_the_slot(shared: Shared) -> None:
    board = shared.scoreboard
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


def test_histogram_is_cumulative_with_inf_last(shared: Shared) -> None:
    board = shared.scoreboard
    board.prepare(0, 0, 0)
    board.prepare(1, 0, 0)
    board.slot(0)[CONNECT_DURATION_BUCKETS + 0] = 2
    board.slot(1)[CONNECT_DURATION_BUCKETS + 3] = 1
    board.slot(1)[CONNECT_DURATION_BUCKETS + len(CONNECT_DURATION_BOUNDS)] = 4  # +Inf
    buckets, _ = board.histogram(CONNECT_DURATION_BUCKETS, CONNECT_DURATION_BOUNDS)
    assert len(buckets) == len(CONNECT_DURATION_BOUNDS) + 1
    assert buckets[0] == 2 and buckets[3] == 3 and buckets[-1] == 7


_EXECED_READER = """
import os, sys
from forkproxy.shared.mapping import SharedMapping
from forkproxy.shared.scoreboard import ACCEPTED, Scoreboard
mapping = SharedMapping.adopt(int(sys.argv[1]))
board = Scoreboard(mapping)
print(board.total(ACCEPTED), board.get(0, ACCEPTED), board.high_water())
board.slot(0)[ACCEPTED] += 1
"""


def test_the_mapping_survives_exec(shared: Shared) -> None:
    """A re-executed master adopts the inherited memfd: the same slots and retired
    totals, so its counters continue where the old image left them."""
    board = shared.scoreboard
    board.prepare(0, 0, 0)
    board.slot(0)[ACCEPTED] = 5
    board.retire(0)  # 5 retired ...
    board.prepare(0, 1, 0)
    board.slot(0)[ACCEPTED] = 2  # ... and 2 live
    fd = shared.mapping.fd
    os.set_inheritable(fd, True)
    result = subprocess.run(
        [sys.executable, "-c", _EXECED_READER, str(fd)],
        pass_fds=[fd],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.split() == ["7", "2", "1"]
    assert board.get(0, ACCEPTED) == 3  # its write is ours


def test_adopt_refuses_what_is_not_our_mapping(shared: Shared) -> None:
    other = os.memfd_create("other")
    try:
        os.ftruncate(other, shared.mapping.size)
        with pytest.raises(LayoutMismatch, match="not forkproxy's shared memory"):
            SharedMapping.adopt(other)
    finally:
        os.close(other)
    shared.mapping.set_header(SLOT_HIGH_WATER, 0)
    adopted = SharedMapping.adopt(os.dup(shared.mapping.fd))
    assert adopted.size == shared.mapping.size
    adopted.close()


def test_listener_rows_fold_into_retired_rows_and_the_gauge_is_live_only(
    shared: Shared,
) -> None:
    board = shared.scoreboard
    board.listener_rows = 2
    for index in (0, 1):
        board.prepare(index, generation=0, started_ns=1)
    board.row(0, 1)[DG_SESSIONS] += 3
    board.row(0, 1)[DG_SESSIONS_ACTIVE] += 2
    board.row(1, 1)[DG_SESSIONS] += 4
    board.row(1, 1)[DG_SESSIONS_ACTIVE] += 1
    board.row(1, 0)[DG_SESSIONS] += 9  # another listener's row
    assert (board.row_total(1, DG_SESSIONS), board.row_live(1, DG_SESSIONS_ACTIVE)) == (7, 3)
    board.retire(0)  # its worker died: its sessions are gone, their count stays
    assert (board.row_total(1, DG_SESSIONS), board.row_live(1, DG_SESSIONS_ACTIVE)) == (7, 1)
    assert board.row(0, 1).tolist() == [0] * len(board.row(0, 1))
    board.prepare(0, generation=1, started_ns=2)
    board.row(0, 1)[DG_SESSIONS] += 1
    assert board.row_total(1, DG_SESSIONS) == 8
    assert board.row_total(0, DG_SESSIONS) == 9
