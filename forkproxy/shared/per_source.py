"""--connections-max-per-source=N: the per-source table of the shared mapping.

Rows of {16-byte key, one uint16 count per slot} (layout.py). A source's connections are
the sum of its row's counts over slots [0, SLOT_HIGH_WATER); each count has one writer,
the slot's worker, and the master zeroes a reaped slot's column. Rows are found by
open addressing (linear probing from `source_row`, a hash the compiled engine computes
identically), and changed only under the admission mutex (admission.py), which also
makes the decision: find or claim the source's row, and count the connection there if
the row's sum is below N. Releasing is the owner's count -= 1 without the mutex: it can
only make a row less used.

Invariants, kept under the mutex: a key is in at most one row, and a row whose counts are
not all zero (*in use*) keeps its key. A probe for key K walks from K's hash row until it
finds K or a never-used row (all-zero key), noting the first free row (in use by no one)
on its way; not found, K claims that free row, else the never-used one. A free row just
before a never-used one is on no live key's probe path, so such rows are turned back into
never-used ones before claiming, and probes stay short however many sources came and went.

Why a death cannot break it: a holder killed in the middle leaves the mutex to the next
locker with EOWNERDEAD. Counts need no repair (the dead slot's column is zeroed by the
master when it reaps it). The only multi-word write is a key, done with DIRTY = row + 1
around it; the locker that finds DIRTY set overwrites that row's possibly torn key with
all ones (a key no client has) and the row is simply free.

Sizing: the table has 2 x min(--connections-max, PER_SOURCE_SOURCES_MAX) rows (layout.py),
so at most half of it is in use while at most `connections_max` sources are connected,
and it never refuses a source below N. Past PER_SOURCE_SOURCES_MAX distinct addresses
connected at once, probes grow longer; once every row is in use, a new address is
refused (counted as a per-source refusal) until one of them has no connection left.

Clients without an IP address (unix sockets, vsock) are not limited. Never logs.
"""

import os
import socket

from forkproxy.shared.layout import (
    KEY_SIZE,
    SOURCE_COUNTS,
    SOURCE_DIRTY,
    SOURCE_ENTRIES,
    SOURCE_ROW_BYTES,
    SOURCE_TABLE,
    WORD,
)
from forkproxy.shared.mapping import SharedMapping

EMPTY_KEY = bytes(KEY_SIZE)  # a never-used row
CLEARED_KEY = b"\xff" * KEY_SIZE  # ff00::/8 is multicast: never a TCP client
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_ROW_COUNTS = SOURCE_ROW_BYTES // 2  # uint16 items from a row to the next
_FIRST_COUNT = SOURCE_COUNTS // 2
_MASK64 = (1 << 64) - 1
_CLEAR_CHUNK_ROWS = 64  # rows read per pread when the master clears a column


def source_key(family: int, peer: object) -> bytes | None:
    """The 16-byte key of a client's IP address, or None for a client without one."""
    if family == socket.AF_INET and isinstance(peer, tuple):
        return _MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, peer[0])
    if family == socket.AF_INET6 and isinstance(peer, tuple):
        host: str = peer[0]
        return socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    return None


def source_row(key: bytes, entries: int) -> int:
    """The row a probe for `key` starts at. The compiled engine computes the same: the key's
    halves as little-endian uint64 `lo` and `hi`, x = lo * 0x9E3779B97F4A7C15 ^ hi, then
    splitmix64's finalizer (every input bit reaches the low bits the modulo keeps: the
    IPv4 part of a key is in the top half of `hi`), then x % entries."""
    low = int.from_bytes(key[:8], "little")
    high = int.from_bytes(key[8:], "little")
    mixed = (low * 0x9E3779B97F4A7C15 & _MASK64) ^ high
    mixed = (mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    mixed = (mixed ^ (mixed >> 27)) * 0x94D049BB133111EB & _MASK64
    return (mixed ^ (mixed >> 31)) % entries


class SourceTable:
    """The table's rows: read and changed under the admission mutex, and by the master
    for a reaped slot."""

    __slots__ = ("entries", "_memory", "_counts", "_words", "_fd")

    def __init__(self, mapping: SharedMapping) -> None:
        self.entries = mapping.header(SOURCE_ENTRIES)
        self._memory = mapping.memory
        end = SOURCE_TABLE + self.entries * SOURCE_ROW_BYTES
        self._counts = memoryview(mapping.memory)[SOURCE_TABLE:end].cast("H")
        self._words = mapping.words
        self._fd = mapping.fd

    def counts_of(self, slot: int) -> memoryview:
        """Slot `slot`'s column, indexed by row: what its worker adds to and takes from."""
        return self._counts[_FIRST_COUNT + slot :: _ROW_COUNTS]

    def key(self, row: int) -> bytes:
        start = SOURCE_TABLE + row * SOURCE_ROW_BYTES
        return self._memory[start : start + KEY_SIZE]

    def total(self, row: int, high_water: int) -> int:
        """Connections of row `row`'s source, over slots [0, high_water)."""
        start = row * _ROW_COUNTS + _FIRST_COUNT
        return sum(self._counts[start : start + high_water])

    def find(self, key: bytes) -> int:
        """The row holding `key`, or -1 (no mutex needed to look: for tests, diagnostics)."""
        entries = self.entries
        if not entries:
            return -1
        row = source_row(key, entries)
        for _ in range(entries):
            stored = self.key(row)
            if stored == key:
                return row
            if stored == EMPTY_KEY:
                return -1
            row = row + 1 if row + 1 < entries else 0
        return -1

    # -- under the admission mutex ---------------------------------------------------------

    def repair(self) -> None:
        """After EOWNERDEAD: clear the key a dead holder may have torn."""
        dirty_index = SOURCE_DIRTY // WORD
        dirty = self._words[dirty_index]
        if 0 < dirty <= self.entries:
            self._write_key(dirty - 1, CLEARED_KEY)
        self._words[dirty_index] = 0

    def find_or_claim(self, key: bytes, high_water: int) -> int:
        """The row for `key`: its own, else a free one now holding it; -1 if none is free."""
        entries = self.entries
        if not entries:
            return -1
        row = source_row(key, entries)
        reusable = end = -1
        for _ in range(entries):
            stored = self.key(row)
            if stored == key:
                return row
            if stored == EMPTY_KEY:
                end = row
                break
            if reusable < 0 and not self.total(row, high_water):
                reusable = row
            row = row + 1 if row + 1 < entries else 0
        if end >= 0:
            before = end
            for _ in range(entries - 1):
                before = before - 1 if before else entries - 1
                if (
                    before == reusable
                    or self.total(before, high_water)
                    or self.key(before) == EMPTY_KEY
                ):
                    break
                self._write_key(before, EMPTY_KEY)
        claim = reusable if reusable >= 0 else end
        if claim >= 0:
            self._write_key(claim, key)
        return claim

    def _write_key(self, row: int, key: bytes) -> None:
        dirty_index = SOURCE_DIRTY // WORD
        self._words[dirty_index] = row + 1
        start = SOURCE_TABLE + row * SOURCE_ROW_BYTES
        self._memory[start : start + KEY_SIZE] = key
        self._words[dirty_index] = 0

    # -- the master ------------------------------------------------------------------------

    def clear_column(self, slot: int) -> None:
        """Zero a reaped slot's counts. Reads the table with pread(2), not through the
        mapping: a load from a never-touched page of a memfd mapping allocates it, a
        read of it does not, and most of a large table is never touched."""
        rows = self.entries
        chunk_bytes = _CLEAR_CHUNK_ROWS * SOURCE_ROW_BYTES
        zeros = bytes(chunk_bytes)
        column = self.counts_of(slot)
        for first in range(0, rows, _CLEAR_CHUNK_ROWS):
            count = min(_CLEAR_CHUNK_ROWS, rows - first)
            data = os.pread(
                self._fd, count * SOURCE_ROW_BYTES, SOURCE_TABLE + first * SOURCE_ROW_BYTES
            )
            if data == zeros[: len(data)]:
                continue
            counts = memoryview(data).cast("H")[_FIRST_COUNT + slot :: _ROW_COUNTS]
            for index, value in enumerate(counts):
                if value:
                    column[first + index] = 0
