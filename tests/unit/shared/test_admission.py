"""The global cap in the shared mapping: exact across processes racing for it, kill-safe
(a dead mutex holder hands the lock on; a dead worker's units come back at its reap),
and a release wakes queue-mode waiters only when there are some."""

import ctypes
import mmap
from collections.abc import Callable, Iterator

import pytest

from forkproxy.shared import futex
from forkproxy.shared.admission import (
    ADMITTED,
    REFUSED_BUSY,
    REFUSED_CAP,
    Admission,
    Admitter,
)
from forkproxy.shared.layout import CAPACITY_SEQ, HELD, WAITERS, WAITING
from tests.support.forked import Child
from tests.support.shared_memory import Shared, make_shared


@pytest.fixture
def shared_of() -> Iterator[Callable[..., Shared]]:
    made: list[Shared] = []

    def make(capacity: int, **options: int) -> Shared:
        made.append(make_shared(capacity, **options))
        return made[-1]

    yield make
    for shared in made:
        shared.close()


def _u32(shared: Shared, offset: int) -> int:
    return int(memoryview(shared.mapping.memory)[offset : offset + 4].cast("I")[0])


def _admit_until_refused(admitter: Admitter, attempts: int) -> int:
    """Try `attempts` admissions (retrying a busy lock); return how many were admitted."""
    admitted = 0
    for _ in range(attempts):
        result = admitter.admit(None)
        while result == REFUSED_BUSY:
            result = admitter.admit(None)
        if result == ADMITTED:
            admitted += 1
        else:
            assert result == REFUSED_CAP
    return admitted


def test_admits_exactly_capacity(shared_of: Callable[..., Shared]) -> None:
    admission = shared_of(3).admission
    admitter = admission.admitter(0)
    assert [admitter.admit(None) for _ in range(3)] == [ADMITTED] * 3
    assert admitter.admit(None) == REFUSED_CAP
    assert admission.in_use() == 3
    admitter.release(ADMITTED)
    assert admission.in_use() == 2
    assert admitter.admit(None) == ADMITTED


def test_the_cap_counts_every_slot(shared_of: Callable[..., Shared]) -> None:
    shared = shared_of(3, slots=3)
    zero, two = shared.admission.admitter(0), shared.admission.admitter(2)
    assert [zero.admit(None), zero.admit(None), two.admit(None)] == [ADMITTED] * 3
    assert zero.admit(None) == two.admit(None) == REFUSED_CAP
    assert (shared.scoreboard.get(0, HELD), shared.scoreboard.get(2, HELD)) == (2, 1)


def test_a_burst_from_processes_admits_exactly_the_capacity(
    shared_of: Callable[..., Shared],
) -> None:
    shared = shared_of(10, slots=4)
    admission = shared.admission
    for _ in range(3):
        children = [
            Child(lambda slot=slot: _admit_until_refused(admission.admitter(slot), 6))
            for slot in range(4)
        ]
        for child in children:
            child.start()  # all four race for the same ten units
        admitted = [child.result() for child in children]
        assert sum(admitted) == 10
        assert admission.in_use() == 10
        for slot, child in enumerate(children):
            assert child.finish() == 0  # exits holding its units ...
            assert admission.in_use() == sum(admitted[slot:])
            admission.reclaim(slot)  # ... which come back when the master reaps it
        assert admission.in_use() == 0


def test_a_burst_of_exactly_the_capacity_is_admitted_whole(
    shared_of: Callable[..., Shared],
) -> None:
    """N requested at once from four processes, cap N: all N admitted, none refused as
    busy (a contended mutex is waited for, not given up on)."""
    shared = shared_of(12, slots=4)
    admission = shared.admission

    def admit_three(slot: int) -> int:
        admitter = admission.admitter(slot)
        return sum(admitter.admit(None) == ADMITTED for _ in range(3))

    children = [Child(lambda slot=slot: admit_three(slot)) for slot in range(4)]
    for child in children:
        child.start()
    assert [child.result() for child in children] == [3, 3, 3, 3]
    assert admission.in_use() == 12
    for slot, child in enumerate(children):
        child.finish()
        admission.reclaim(slot)
    assert admission.in_use() == 0


def test_racing_processes_never_exceed_the_capacity(shared_of: Callable[..., Shared]) -> None:
    """Two processes admit and release as fast as they can; a connection counts itself
    in flight (an atomic add) only between its admit and its release, and each process
    notes the most it saw in flight."""
    admission = shared_of(1).admission
    scratch = mmap.mmap(-1, 4096)  # MAP_SHARED: the children's in-flight count
    anchor = ctypes.c_char.from_buffer(scratch)
    in_flight = ctypes.addressof(anchor)
    view = memoryview(scratch).cast("I")

    def race(slot: int) -> int:
        admitter = admission.admitter(slot)
        peak = 0
        for _ in range(10000):
            if admitter.admit(None) != ADMITTED:
                continue
            futex.add(in_flight, 1)
            for _ in range(20):  # hold it a moment: an overlap would show
                pass
            peak = max(peak, view[0])
            futex.add(in_flight, -1)
            admitter.release(ADMITTED)
        return peak

    for _ in range(3):
        children = [Child(lambda slot=slot: race(slot)) for slot in (0, 1)]
        for child in children:
            child.start()
        peaks = [child.result() for child in children]
        for child in children:
            child.finish()
        assert max(peaks) == 1  # reached, never exceeded
        assert admission.in_use() == 0
    view.release()
    del anchor
    scratch.close()


def test_a_killed_mutex_holder_hands_the_lock_on(shared_of: Callable[..., Shared]) -> None:
    admission = shared_of(4).admission
    admitter = admission.admitter(0)
    locker = Child(lambda: int(admission.admitter(1)._lock()))
    locker.start()
    assert locker.result() == 1
    assert admitter.admit(None) == REFUSED_BUSY  # refused after a short wait, never blocked
    locker.kill()
    assert admitter.admit(None) == ADMITTED  # EOWNERDEAD, made consistent
    assert admitter.admit(None) == ADMITTED
    assert admission.in_use() == 2


def test_a_holder_exiting_with_the_lock_hands_it_on(shared_of: Callable[..., Shared]) -> None:
    admission = shared_of(4).admission
    locker = Child(lambda: int(admission.admitter(1)._lock()))
    locker.start()
    assert locker.result() == 1
    assert locker.finish() == 0
    assert admission.admitter(0).admit(None) == ADMITTED


def test_units_of_a_killed_process_come_back_at_its_reap(
    shared_of: Callable[..., Shared],
) -> None:
    admission = shared_of(3).admission
    holder = Child(lambda: _admit_until_refused(admission.admitter(1), 3))
    holder.start()
    assert holder.result() == 3
    holder.kill()
    admitter = admission.admitter(0)
    # Until the master reaps it, a dead worker's units count: high, never low.
    assert admission.in_use() == 3
    assert admitter.admit(None) == REFUSED_CAP
    admission.reclaim(1)
    assert admission.in_use() == 0
    assert _admit_until_refused(admitter, 4) == 3


def test_a_release_wakes_only_when_someone_waits(shared_of: Callable[..., Shared]) -> None:
    shared = shared_of(1)
    zero, one = shared.admission.admitter(0), shared.admission.admitter(1)
    assert zero.admit(None) == ADMITTED
    zero.release(ADMITTED)
    assert _u32(shared, CAPACITY_SEQ) == 0  # nobody waits: no futex call at all
    assert zero.admit(None) == ADMITTED
    one.wait_begin()
    assert (_u32(shared, WAITERS), shared.scoreboard.get(1, WAITING)) == (1, 1)
    seq = one.capacity_seq()
    assert one.admit(None) == REFUSED_CAP
    zero.release(ADMITTED)
    assert one.capacity_seq() == seq + 1
    assert one.admit(None) == ADMITTED
    one.wait_end()
    assert (_u32(shared, WAITERS), shared.scoreboard.get(1, WAITING)) == (0, 0)


def test_the_reap_of_a_waiter_takes_it_out_of_the_waiters(
    shared_of: Callable[..., Shared],
) -> None:
    shared = shared_of(1)
    admission = shared.admission

    def wait() -> int:
        admission.admitter(1).wait_begin()
        return 0

    waiter = Child(wait)
    waiter.start()
    assert waiter.result() == 0
    waiter.kill()
    assert _u32(shared, WAITERS) == 1
    admission.reclaim(1)
    assert (_u32(shared, WAITERS), shared.scoreboard.get(1, WAITING)) == (0, 0)
    assert _u32(shared, CAPACITY_SEQ) == 0  # nobody left to wake


def test_set_up_writes_the_limits(shared_of: Callable[..., Shared]) -> None:
    admission: Admission = shared_of(7, per_source=2).admission
    assert (admission.capacity, admission.per_source) == (7, 2)
