"""Ranks: one worker of a generation reads each datagram listener, whatever happens."""

import pytest

from forkproxy.shared.protocol import reads_datagram_listener
from forkproxy.supervisor.ranks import Ranks


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("listeners", [1, 2, 5])
def test_each_datagram_listener_has_exactly_one_reader(workers: int, listeners: int) -> None:
    ranks = Ranks(workers, listeners)
    assigned = [ranks.assign(slot) for slot in range(10, 10 + workers)]
    assert sorted(assigned) == list(range(workers))
    for index in range(listeners):
        readers = [rank for rank in assigned if reads_datagram_listener(index, rank, workers)]
        assert len(readers) == 1


def test_a_replacement_in_the_same_slot_keeps_its_rank() -> None:
    ranks = Ranks(3, 3)
    assert [ranks.assign(slot) for slot in (4, 5, 6)] == [0, 1, 2]
    assert ranks.assign(5) == 1  # the worker in slot 5 died and is respawned there


def test_added_workers_read_no_datagram_listener() -> None:
    ranks = Ranks(2, 4)
    ranks.assign(0)
    ranks.assign(1)
    added = ranks.assign(7)  # SIGTTIN
    assert added == 2
    assert not any(reads_datagram_listener(index, added, ranks.size) for index in range(4))


def test_stopping_a_reader_asks_for_a_new_generation() -> None:
    ranks = Ranks(3, 2)
    for slot in (0, 1, 2):
        ranks.assign(slot)
    assert ranks.free(2) is False  # rank 2 reads neither of the 2 listeners
    assert ranks.free(1) is True  # rank 1 reads listener 1
    assert ranks.assign(9) == 1  # the lowest free rank again
    ranks.new_generation(2)
    assert (ranks.size, ranks.assign(3)) == (2, 0)


def test_without_datagram_listeners_nothing_is_orphaned() -> None:
    ranks = Ranks(2, 0)
    ranks.assign(0)
    assert ranks.free(0) is False


def test_ranks_restored_after_a_reload_keep_each_slots_rank() -> None:
    """The new image of a reload that goes on with the old generation: a replacement in a
    slot gets that slot's rank, not the lowest one that looks free."""
    before = Ranks(3, 3)
    for slot in (4, 5, 6):
        before.assign(slot)
    after = Ranks(2, 3)  # the new image's, made for other settings
    after.restore(before.size, before.assigned())
    assert after.size == 3
    assert after.assign(6) == 2  # the worker in slot 6 died: its replacement reads listener 2
    assert after.assign(9) == 3  # one added later reads none
