"""The scoreboard: one slot of int64 words per worker in the shared mapping, and the
master's retired totals beside them.

The worker that owns a slot is its only writer while it lives, and the master reads it at
any time without asking; the master writes a slot only while no process owns it: before
forking its worker (`prepare`), and after reaping it (`retire`), when it folds the
counters into RETIRED, also in the mapping, so a re-executed master reports the same
totals and nothing goes backwards. Plain aligned 8-byte stores: a reader sees each word
old or new, never torn. The fields, their units and writers: layout.py. Sums run over
slots [0, SLOT_HIGH_WATER) only: slots never prepared are zero, and reading their pages
would allocate them. So do the rows' sums and folds: over the rows of the listeners
there are (`listener_rows`) and of the target table's rows handed out (`target_rows`).
Never logs and never decides policy.
"""

import enum
from collections.abc import Sequence

from forkproxy.shared.layout import (
    ACCEPTED,
    ACTIVE,
    BYTES_TO_CLIENT,
    BYTES_TO_TARGET,
    CLOSED,
    CONNECT_DURATION_BOUNDS,
    CONNECT_DURATION_BUCKETS,
    CONNECT_DURATION_SUM_NS,
    CONNECT_ERRORS,
    CONNECTION_DURATION_BOUNDS,
    CONNECTION_DURATION_BUCKETS,
    CONNECTION_DURATION_SUM_NS,
    GENERATION,
    HEARTBEAT_NS,
    LAST_ACTIVITY_NS,
    LISTENER_ROWS,
    MAX_LISTENERS,
    MAX_SLOTS,
    MAX_TARGETS,
    PID,
    REFUSED,
    RETIRED,
    RETIRED_ROWS,
    ROW_WORDS,
    SLOT_BYTES,
    SLOT_COUNTERS,
    SLOT_HIGH_WATER,
    SLOT_STRIDE,
    SLOT_WORDS,
    SLOTS,
    STARTED_NS,
    STATE,
    TARGET_ROWS,
    WORD,
)
from forkproxy.shared.mapping import SharedMapping

__all__ = [
    "ACCEPTED",
    "ACTIVE",
    "BYTES_TO_CLIENT",
    "BYTES_TO_TARGET",
    "CLOSED",
    "CONNECT_DURATION_BOUNDS",
    "CONNECT_DURATION_BUCKETS",
    "CONNECT_DURATION_SUM_NS",
    "CONNECT_ERRORS",
    "CONNECTION_DURATION_BOUNDS",
    "CONNECTION_DURATION_BUCKETS",
    "CONNECTION_DURATION_SUM_NS",
    "GENERATION",
    "HEARTBEAT_NS",
    "LAST_ACTIVITY_NS",
    "PID",
    "REFUSED",
    "SLOT_WORDS",
    "STARTED_NS",
    "STATE",
    "Scoreboard",
    "SlotState",
]

_ZEROS = memoryview(bytes(SLOT_WORDS * WORD)).cast("q")
_ZERO_ROW = memoryview(bytes(ROW_WORDS * WORD)).cast("q")
_ROWS = LISTENER_ROWS // WORD  # word index of a slot's first listener row
_TARGET_ROWS = TARGET_ROWS // WORD  # ... and of its first target row
_RETIRED_TARGETS = MAX_LISTENERS * ROW_WORDS  # the target rows' place in RETIRED_ROWS


class SlotState(enum.IntEnum):
    FREE = 0  # no process owns the slot
    STARTING = 1  # forked, not yet accepting
    SERVING = 2  # accepting connections
    DRAINING = 3  # stopped accepting; finishing open connections


class Scoreboard:
    """The shared slots and their retired totals, in `mapping`."""

    def __init__(self, mapping: SharedMapping, listeners: int = 0) -> None:
        self.slot_count = MAX_SLOTS
        self._mapping = mapping
        memory = memoryview(mapping.memory)
        self._words = memory[SLOTS : SLOTS + MAX_SLOTS * SLOT_BYTES].cast("q")
        self._retired = memory[RETIRED : RETIRED + MAX_SLOTS * SLOT_WORDS * WORD].cast("q")
        rows_bytes = (MAX_LISTENERS + MAX_TARGETS) * ROW_WORDS * WORD
        self._retired_rows = memory[RETIRED_ROWS : RETIRED_ROWS + rows_bytes].cast("q")
        # Listener rows [0, this) may be written: one per listener the master has, or had
        # before a reload (its old workers still write theirs).
        self.listener_rows = min(listeners, MAX_LISTENERS)
        # Target rows [0, this) may be written: the target table's high water (the
        # master's to set, as it hands rows out).
        self.target_rows = 0

    def widen_listener_rows(self, listeners: int) -> None:
        """A reload's listeners: rows [0, `listeners`) may be written too."""
        self.listener_rows = max(self.listener_rows, min(listeners, MAX_LISTENERS))

    def slot(self, index: int) -> memoryview:
        """The words of slot `index`, for its owner to write with `slot[FIELD] += n`."""
        start = index * SLOT_STRIDE
        return self._words[start : start + SLOT_WORDS]

    def get(self, index: int, field: int) -> int:
        return self._words[index * SLOT_STRIDE + field]

    def row(self, index: int, listener: int) -> memoryview:
        """The words of slot `index`'s row for listener `listener` (< MAX_LISTENERS), for
        the slot's owner to write with `row[WORD] += n`."""
        start = index * SLOT_STRIDE + _ROWS + listener * ROW_WORDS
        return self._words[start : start + ROW_WORDS]

    def row_live(self, listener: int, word: int) -> int:
        """A listener row's word summed over the live and prepared slots (a gauge)."""
        offset = _ROWS + listener * ROW_WORDS + word
        words = self._words
        return sum(words[index * SLOT_STRIDE + offset] for index in range(self.high_water()))

    def row_total(self, listener: int, word: int) -> int:
        """A listener row's counter over all slots, past and present."""
        return self._retired_rows[listener * ROW_WORDS + word] + self.row_live(listener, word)

    def target_row(self, index: int, row: int) -> memoryview:
        """The words of slot `index`'s row for target-table row `row` (< MAX_TARGETS), for
        the slot's owner to write with `row[T_WORD] += n`."""
        start = index * SLOT_STRIDE + _TARGET_ROWS + row * ROW_WORDS
        return self._words[start : start + ROW_WORDS]

    def target_live(self, row: int, word: int) -> int:
        """A target row's word summed over the live and prepared slots (a gauge)."""
        offset = _TARGET_ROWS + row * ROW_WORDS + word
        words = self._words
        return sum(words[index * SLOT_STRIDE + offset] for index in range(self.high_water()))

    def target_total(self, row: int, word: int) -> int:
        """A target row's counter over all slots, past and present."""
        retired = self._retired_rows[_RETIRED_TARGETS + row * ROW_WORDS + word]
        return retired + self.target_live(row, word)

    def forget_target_totals(self, row: int) -> None:
        """Master: target-table row `row` now counts for another target; the retired
        totals of the one it had are not its."""
        start = _RETIRED_TARGETS + row * ROW_WORDS
        self._retired_rows[start : start + ROW_WORDS] = _ZERO_ROW

    def high_water(self) -> int:
        """Slots [0, this) have ever been prepared."""
        return min(self._mapping.header(SLOT_HIGH_WATER), MAX_SLOTS)

    def prepare(self, index: int, generation: int, started_ns: int) -> None:
        """Master, before forking a worker into a free slot."""
        start = index * SLOT_STRIDE
        self._words[start : start + SLOT_WORDS] = _ZEROS
        self._words[start + GENERATION] = generation
        self._words[start + STARTED_NS] = started_ns
        self._words[start + HEARTBEAT_NS] = started_ns
        self._words[start + STATE] = SlotState.STARTING
        if index >= self.high_water():
            # Before the fork: every admitter counts this slot's HELD from its first admit.
            self._mapping.set_header(SLOT_HIGH_WATER, index + 1)

    def retire(self, index: int) -> None:
        """Master, after reaping the slot's worker (and `Admission.reclaim`): keep its
        counters, free the slot."""
        start = index * SLOT_STRIDE
        retired = self._retired
        base = index * SLOT_WORDS
        for field in SLOT_COUNTERS:
            retired[base + field] += self._words[start + field]
        self._words[start : start + SLOT_WORDS] = _ZEROS
        rows = [(start + _ROWS + n * ROW_WORDS, n * ROW_WORDS) for n in range(self.listener_rows)]
        rows += [
            (start + _TARGET_ROWS + n * ROW_WORDS, _RETIRED_TARGETS + n * ROW_WORDS)
            for n in range(min(self.target_rows, MAX_TARGETS))
        ]
        words, retired_rows = self._words, self._retired_rows
        for row, into in rows:
            for word in range(ROW_WORDS):
                retired_rows[into + word] += words[row + word]
            words[row : row + ROW_WORDS] = _ZERO_ROW

    def counter(self, index: int, field: int) -> int:
        """A slot's counter including every worker that ever ran in it."""
        return self._retired[index * SLOT_WORDS + field] + self._words[index * SLOT_STRIDE + field]

    def total(self, field: int) -> int:
        """A counter summed over all slots, past and present."""
        return sum(self.counter(index, field) for index in range(self.high_water()))

    def histogram(self, first_bucket: int, bounds: Sequence[float]) -> tuple[list[int], int]:
        """Cumulative bucket counts (last is +Inf) and the sum in ns, over all slots."""
        buckets = [self.total(first_bucket + i) for i in range(len(bounds) + 1)]
        cumulative = []
        running = 0
        for count in buckets:
            running += count
            cumulative.append(running)
        return cumulative, self.total(first_bucket + len(bounds) + 1)

    def close(self) -> None:
        """Drop this process's views (the mapping itself is closed by its owner)."""
        for view in (self._words, self._retired, self._retired_rows):
            try:
                view.release()
            except BufferError:
                pass
