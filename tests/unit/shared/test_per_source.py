"""The per-source limit: exact across processes, and nothing lost to a SIGKILL."""

import socket
from collections.abc import Callable, Iterator

import pytest

from forkproxy.shared.admission import NO_TOKEN
from forkproxy.shared.per_source import BUSY, SourceLimit, entries_for, source_key
from tests.support.forked import Child


def _key(family: int, peer: object) -> bytes:
    key = source_key(family, peer)
    assert key is not None
    return key


A = _key(socket.AF_INET, ("127.0.0.1", 40000))
B = _key(socket.AF_INET, ("127.0.0.2", 40000))
C = _key(socket.AF_INET6, ("2001:db8::1", 40000, 0, 0))


@pytest.fixture
def make_limit() -> Iterator[Callable[[int, int], SourceLimit]]:
    made: list[SourceLimit] = []

    def make(per_source: int, entries: int) -> SourceLimit:
        limit = SourceLimit(per_source, entries)
        made.append(limit)
        return limit

    yield make
    for limit in made:
        limit.remove()
        limit.close()


def test_source_keys() -> None:
    mapped = source_key(socket.AF_INET6, ("::ffff:127.0.0.1", 1, 0, 0))
    assert mapped == A  # IPv4 through a dual-stack listener counts as the same source
    assert source_key(socket.AF_INET6, ("fe80::1%lo", 1, 0, 1)) == source_key(
        socket.AF_INET6, ("fe80::1", 1, 0, 0)
    )
    assert source_key(socket.AF_UNIX, "") is None
    assert len({A, B, C}) == 3


def test_entries_follow_the_cap() -> None:
    assert entries_for(256) == 256
    assert entries_for(1) == 1
    assert entries_for(10**6) < 32768  # SEMMSL bounds a set


def test_limit_per_source(make_limit: Callable[[int, int], SourceLimit]) -> None:
    limit = make_limit(2, 8)
    first, second = limit.try_acquire(A), limit.try_acquire(A)
    assert first == second >= 0  # one entry per source
    assert limit.try_acquire(A) == NO_TOKEN
    assert limit.try_acquire(B) >= 0  # another source is not affected
    assert (limit.in_use(A), limit.in_use(B), limit.in_use(C)) == (2, 1, 0)
    limit.release(first)
    assert limit.in_use(A) == 1
    assert limit.try_acquire(A) == first


def test_a_lower_limit_per_call_counts_the_same_source(
    make_limit: Callable[[int, int], SourceLimit],
) -> None:
    """Listeners with limits of their own share the count: a source with 2 connections
    is refused where the limit is 2, admitted where it is 4."""
    limit = make_limit(4, 8)
    first = limit.try_acquire(A, 2)
    assert limit.try_acquire(A, 2) == first >= 0
    assert limit.try_acquire(A, 2) == NO_TOKEN
    assert limit.try_acquire(A, 1) == NO_TOKEN
    assert limit.try_acquire(A) == first  # 0: the table's own limit, 4
    assert limit.try_acquire(A, 4) == first
    assert limit.try_acquire(A, 4) == NO_TOKEN
    assert limit.in_use(A) == 4
    assert limit.try_acquire(B, 1) >= 0  # another source is not affected
    limit.release(first)
    assert limit.try_acquire(A, 2) == NO_TOKEN  # 3 held: still at or over 2
    assert limit.try_acquire(A, 4) == first


def test_a_lower_limit_is_exact_across_processes(
    make_limit: Callable[[int, int], SourceLimit],
) -> None:
    limit = make_limit(8, 16)
    children = [Child(lambda: limit.try_acquire(A, 3)) for _ in range(12)]
    for child in children:
        child.start()  # all race for the same source, under the lower limit
    results = [child.result() for child in children]
    assert sum(result >= 0 for result in results) == 3
    assert limit.in_use(A) == 3
    assert [child.finish() for child in children] == [0] * 12
    assert limit.in_use(A) == 0


def test_a_full_table_refuses_new_sources_only(
    make_limit: Callable[[int, int], SourceLimit],
) -> None:
    limit = make_limit(1, 2)
    token_a, token_b = limit.try_acquire(A), limit.try_acquire(B)
    assert limit.try_acquire(C) == NO_TOKEN  # both entries in use
    limit.release(token_a)
    token_c = limit.try_acquire(C)
    assert token_c == token_a  # A's entry was free: C took it over
    assert limit.in_use(A) == 0
    assert limit.try_acquire(A) == NO_TOKEN  # B and C hold the two entries
    limit.release(token_b)
    limit.release(token_c)


def test_exact_across_processes(make_limit: Callable[[int, int], SourceLimit]) -> None:
    limit = make_limit(3, 16)
    for _ in range(3):
        children = [Child(lambda: limit.try_acquire(A)) for _ in range(12)]
        for child in children:
            child.start()  # all race for the same source
        results = [child.result() for child in children]
        assert sum(result >= 0 for result in results) == 3
        assert all(result in (NO_TOKEN, max(results)) for result in results)
        assert limit.in_use(A) == 3
        assert [child.finish() for child in children] == [0] * 12
        assert limit.in_use(A) == 0  # exit without release: SEM_UNDO gave them back


def test_sigkill_of_a_holder_returns_its_units(
    make_limit: Callable[[int, int], SourceLimit],
) -> None:
    limit = make_limit(2, 4)
    holder = Child(lambda: min(limit.try_acquire(A), limit.try_acquire(A)))
    holder.start()
    assert holder.result() >= 0
    assert limit.in_use(A) == 2
    assert limit.try_acquire(A) == NO_TOKEN
    holder.kill()
    assert limit.in_use(A) == 0
    assert limit.try_acquire(A) >= 0
    assert limit.try_acquire(A) >= 0
    assert limit.try_acquire(A) == NO_TOKEN


def test_sigkill_of_the_lock_holder_releases_the_lock(
    make_limit: Callable[[int, int], SourceLimit],
) -> None:
    limit = make_limit(2, 4)
    locker = Child(lambda: int(limit._lock()))
    locker.start()
    assert locker.result() == 1
    assert limit.try_acquire(A) == BUSY  # refused after a short wait, never blocked
    locker.kill()
    assert limit.try_acquire(A) >= 0


def test_a_claim_torn_by_sigkill_is_repaired(
    make_limit: Callable[[int, int], SourceLimit],
) -> None:
    """The worst tear: a dying claimer left a copy of a live source's key in an earlier
    entry. Unrepaired, the source would count in two entries and get 2N."""
    limit = make_limit(2, 4)
    token_b = limit.try_acquire(B)  # entry 0
    token_a = limit.try_acquire(A)  # entry 1: A holds one unit
    assert (token_b, token_a) == (0, 1)
    limit.release(token_b)  # entry 0 free again

    def torn_claim() -> int:
        assert limit._lock()
        limit._words[0] = 0 + 1  # DIRTY: claiming entry 0 ...
        limit._write_key(0, A)  # ... and killed before finishing
        return 1

    claimer = Child(torn_claim)
    claimer.start()
    assert claimer.result() == 1
    claimer.kill()
    assert limit.try_acquire(A) == token_a  # the repair cleared entry 0's copy
    assert limit.try_acquire(A) == NO_TOKEN
    assert limit.in_use(A) == 2
    assert limit._words[0] == 0


def test_removed_set_refuses(make_limit: Callable[[int, int], SourceLimit]) -> None:
    limit = make_limit(1, 2)
    limit.remove()
    assert limit.try_acquire(A) == BUSY


def test_bad_per_source() -> None:
    with pytest.raises(ValueError, match="per_source must be in 1-32767"):
        SourceLimit(0, 1)
