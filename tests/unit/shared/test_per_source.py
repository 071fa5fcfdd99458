"""The per-source limit: exact across processes, repaired after a torn claim, and nothing
lost to a SIGKILL once the master has reaped the dead worker."""

import os
import socket
from collections.abc import Callable, Iterator

import pytest

from forkproxy.shared.admission import ADMITTED, REFUSED_BUSY, REFUSED_CAP, REFUSED_SOURCE
from forkproxy.shared.layout import (
    PER_SOURCE_SOURCES_MAX,
    SOURCE_DIRTY,
    SOURCE_ROW_BYTES,
    SOURCE_TABLE,
    source_entries,
)
from forkproxy.shared.per_source import CLEARED_KEY, EMPTY_KEY, source_key, source_row
from tests.support.forked import Child
from tests.support.shared_memory import Shared, make_shared


def _key(family: int, peer: object) -> bytes:
    key = source_key(family, peer)
    assert key is not None
    return key


A = _key(socket.AF_INET, ("127.0.0.1", 40000))
B = _key(socket.AF_INET, ("127.0.0.2", 40000))
C = _key(socket.AF_INET6, ("2001:db8::1", 40000, 0, 0))


@pytest.fixture
def shared_of() -> Iterator[Callable[..., Shared]]:
    made: list[Shared] = []

    def make(capacity: int, **options: int) -> Shared:
        made.append(make_shared(capacity, **options))
        return made[-1]

    yield make
    for shared in made:
        shared.close()


def _admit(shared: Shared, slot: int, key: bytes) -> int:
    result = shared.admission.admitter(slot).admit(key)
    while result == REFUSED_BUSY:
        result = shared.admission.admitter(slot).admit(key)
    return result


def test_source_keys() -> None:
    mapped = source_key(socket.AF_INET6, ("::ffff:127.0.0.1", 1, 0, 0))
    assert mapped == A  # IPv4 through a dual-stack listener counts as the same source
    assert source_key(socket.AF_INET6, ("fe80::1%lo", 1, 0, 1)) == source_key(
        socket.AF_INET6, ("fe80::1", 1, 0, 0)
    )
    assert source_key(socket.AF_UNIX, "") is None
    assert len({A, B, C, EMPTY_KEY, CLEARED_KEY}) == 5


@pytest.mark.parametrize(
    ("key", "entries", "row"),
    [
        (A, 512, 222),
        (A, 32768, 30430),
        (A, 1 << 64, 17543371208095528670),  # the whole 64-bit hash
        (B, 512, 397),
        (C, 32768, 4869),
    ],
)
def test_probe_start_rows(key: bytes, entries: int, row: int) -> None:
    """Fixed values: the compiled engine's source_row must give the same rows."""
    assert source_row(key, entries) == row
    try:
        from forkproxy.relay import _engine
    except ImportError:
        return
    assert _engine.source_row(key, entries) == row


def test_table_size_follows_the_cap_up_to_a_bound() -> None:
    assert source_entries(256) == 512
    assert source_entries(1) == 2
    assert source_entries(10**9) == 2 * PER_SOURCE_SOURCES_MAX


def test_limit_per_source(shared_of: Callable[..., Shared]) -> None:
    shared = shared_of(8, per_source=2)
    admission = shared.admission
    first, second = _admit(shared, 0, A), _admit(shared, 0, A)
    assert first == second >= 0  # one row per source
    assert _admit(shared, 0, A) == REFUSED_SOURCE
    assert _admit(shared, 1, A) == REFUSED_SOURCE  # the limit counts every slot
    assert _admit(shared, 1, B) >= 0  # another source is not affected
    assert admission.admitter(0).admit(None) == ADMITTED  # nor a client without an address
    assert [admission.source_in_use(key) for key in (A, B, C)] == [2, 1, 0]
    assert admission.in_use() == 4
    admission.admitter(0).release(first)
    assert (admission.source_in_use(A), admission.in_use()) == (1, 3)
    assert _admit(shared, 1, A) == first


def test_a_listener_limit_counts_the_source_across_listeners(
    shared_of: Callable[..., Shared],
) -> None:
    """Listeners with limits of their own share one count per source: a source with 2
    connections is refused where the limit is 2 and admitted where it is 4."""
    shared = shared_of(16, per_source=4)
    admitter = shared.admission.admitter(0)

    def admit(limit: int) -> int:
        result = admitter.admit(A, limit)
        while result == REFUSED_BUSY:
            result = admitter.admit(A, limit)
        return result

    first = admit(2)
    assert admit(2) == first >= 0
    assert admit(2) == REFUSED_SOURCE
    assert admit(1) == REFUSED_SOURCE
    assert admit(4) == first  # 3
    assert admit(0) == first  # 0: the table's limit, 4
    assert admit(4) == REFUSED_SOURCE
    assert admit(8) == first  # a listener with a higher limit still counts the same row
    assert shared.admission.source_in_use(A) == 5
    for _ in range(4):
        admitter.release(first)
    assert admit(2) == first  # 1 held: below 2 again


def test_the_global_cap_comes_first(shared_of: Callable[..., Shared]) -> None:
    shared = shared_of(2, per_source=2)
    assert _admit(shared, 0, A) >= 0 and _admit(shared, 0, B) >= 0
    assert _admit(shared, 0, C) == REFUSED_CAP
    assert shared.admission.source_in_use(C) == 0


def test_a_full_table_refuses_new_sources_only(shared_of: Callable[..., Shared]) -> None:
    shared = shared_of(4, per_source=1, connections_max=1)  # two rows
    admission = shared.admission
    row_a, row_b = _admit(shared, 0, A), _admit(shared, 0, B)
    assert sorted([row_a, row_b]) == [0, 1]
    assert _admit(shared, 0, C) == REFUSED_SOURCE  # both rows in use
    admission.admitter(0).release(row_a)
    row_c = _admit(shared, 0, C)
    assert row_c == row_a  # A's row was free: C took it over
    assert admission.source_in_use(A) == 0
    assert _admit(shared, 0, A) == REFUSED_SOURCE  # B and C hold the two rows


def test_keys_stay_found_as_sources_come_and_go(shared_of: Callable[..., Shared]) -> None:
    """Many sources through a small table: each key in at most one row, every live
    source's count intact, and rows freed behind them reused."""
    shared = shared_of(64, per_source=3, connections_max=8)  # 16 rows
    admission = shared.admission
    admitter = admission.admitter(0)
    live: dict[bytes, list[int]] = {}
    for round_ in range(40):
        key = bytes(12) + b"\xff\xff" + round_.to_bytes(2, "big")
        rows = [_admit(shared, 0, key) for _ in range(2)]
        assert rows[0] == rows[1] >= 0
        live[key] = rows
        if len(live) > 6:  # the oldest source leaves
            old, old_rows = next(iter(live.items()))
            for row in old_rows:
                admitter.release(row)
            del live[old]
        keys = [admission.table.key(row) for row in range(admission.table.entries)]
        used = [key for key in keys if key not in (EMPTY_KEY, CLEARED_KEY)]
        assert len(used) == len(set(used))  # a key in at most one row
        for live_key in live:
            assert admission.source_in_use(live_key) == 2
    assert admission.in_use() == 2 * len(live)


def test_exact_across_processes(shared_of: Callable[..., Shared]) -> None:
    shared = shared_of(64, per_source=3, slots=12)
    admission = shared.admission
    for _ in range(3):
        children = [Child(lambda slot=slot: _admit(shared, slot, A)) for slot in range(12)]
        for child in children:
            child.start()  # all race for the same source
        results = [child.result() for child in children]
        assert sum(result >= 0 for result in results) == 3
        assert all(result in (REFUSED_SOURCE, max(results)) for result in results)
        assert admission.source_in_use(A) == 3
        for slot, child in enumerate(children):
            assert child.finish() == 0
            admission.reclaim(slot)  # the master after reaping it
        assert (admission.source_in_use(A), admission.in_use()) == (0, 0)


def test_a_killed_holders_units_come_back_at_its_reap(shared_of: Callable[..., Shared]) -> None:
    shared = shared_of(8, per_source=2)
    admission = shared.admission
    holder = Child(lambda: min(_admit(shared, 1, A), _admit(shared, 1, A)))
    holder.start()
    assert holder.result() >= 0
    assert admission.source_in_use(A) == 2
    holder.kill()
    assert _admit(shared, 0, A) == REFUSED_SOURCE  # not reaped yet: still counted
    admission.reclaim(1)
    assert admission.source_in_use(A) == 0
    assert _admit(shared, 0, A) >= 0
    assert _admit(shared, 0, A) >= 0
    assert _admit(shared, 0, A) == REFUSED_SOURCE


def test_a_claim_torn_by_sigkill_is_repaired(shared_of: Callable[..., Shared]) -> None:
    """The worst tear: a dying claimer left a copy of a live source's key in a free row
    ahead of that source's own row on its probe path. Unrepaired, the source would count
    in two rows and get twice the limit."""
    shared = shared_of(16, per_source=2, connections_max=8)
    admission = shared.admission
    table = admission.table
    start = source_row(A, table.entries)
    other = next(  # a source whose probe starts at A's row
        key
        for key in (_key(socket.AF_INET, (f"10.0.{i >> 8}.{i & 255}", 1)) for i in range(4096))
        if source_row(key, table.entries) == start
    )
    row_other = _admit(shared, 0, other)
    row_a = _admit(shared, 0, A)  # A holds one unit, in the row after
    assert (row_other, row_a) == (start, (start + 1) % table.entries)
    admission.admitter(0).release(row_other)  # A's probe now passes a free row first

    def torn_claim() -> int:
        assert admission.admitter(1)._lock()
        shared.mapping.set_header(SOURCE_DIRTY, start + 1)  # claiming that row ...
        offset = SOURCE_TABLE + start * SOURCE_ROW_BYTES
        table._memory[offset : offset + 16] = A  # ... and killed in the middle
        return 1

    claimer = Child(torn_claim)
    claimer.start()
    assert claimer.result() == 1
    claimer.kill()
    assert _admit(shared, 0, A) == row_a  # the repair cleared the torn copy
    assert _admit(shared, 0, A) == REFUSED_SOURCE
    assert admission.source_in_use(A) == 2
    assert table.key(start) == CLEARED_KEY
    assert shared.mapping.header(SOURCE_DIRTY) == 0


def test_the_master_clears_a_column_without_touching_the_table(
    shared_of: Callable[..., Shared],
) -> None:
    """A large table is mostly pages never touched; clearing a reaped slot's column must
    not allocate them (tmpfs allocates a page on a load through the mapping)."""
    shared = shared_of(10**9, per_source=4)
    row = _admit(shared, 1, A)
    assert row >= 0
    allocated = os.fstat(shared.mapping.fd).st_blocks
    shared.admission.reclaim(1)
    assert os.fstat(shared.mapping.fd).st_blocks == allocated
    assert shared.admission.source_in_use(A) == 0


def test_a_source_counted_after_admission(shared_of: Callable[..., Shared]) -> None:
    """--accept-proxy: a unit of the cap at accept, the source once its header said it."""
    shared = shared_of(8, per_source=1)
    admission = shared.admission
    admitter = admission.admitter(0)
    first, second = admitter.admit(None), admitter.admit(None)
    assert first == second == ADMITTED
    row = admitter.admit_source(A, 0)  # 0: the mapping's limit
    assert row >= 0
    assert admitter.admit_source(A, 0) == REFUSED_SOURCE  # the second keeps its unit only
    assert (admission.source_in_use(A), admission.in_use()) == (1, 2)
    assert admitter.admit_source(B, 2) >= 0  # a listener's own limit
    admitter.release(row)  # the unit and the source's count
    assert (admission.source_in_use(A), admission.in_use()) == (0, 1)
    assert shared_of(8).admission.admitter(0).admit_source(A, 0) == ADMITTED  # no limit
