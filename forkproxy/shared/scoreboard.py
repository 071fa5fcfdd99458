"""The scoreboard: anonymous shared memory with one fixed-size slot per worker.

Created by the master before the first fork (MAP_SHARED | MAP_ANONYMOUS), so every
worker sees the same pages. A slot is an array of signed 64-bit words; the worker that
owns a slot is its only writer while it lives, and the master reads it at any time
without asking. The master writes a slot only while no process owns it: before forking
its worker, and after reaping it (`retire`). Plain aligned 8-byte stores: a reader sees
each word old or new, never torn.

Slot layout (index: field, unit, writer):

  0  PID                 pid                          worker, at start
  1  GENERATION          rotation number              master, before fork
  2  STATE               SlotState                    master before fork, then worker
  3  HEARTBEAT_NS        CLOCK_MONOTONIC ns           worker, every heartbeat interval
  4  STARTED_NS          CLOCK_MONOTONIC ns           master, before fork
  5  LAST_ACTIVITY_NS    CLOCK_MONOTONIC ns           worker, when a connection closes
  6  ACTIVE              connections open now         worker
  7- counters (from FIRST_COUNTER): monotonic totals, folded into the master's retired
     totals when the worker dies, so what the master reports never goes backwards:
     ACCEPTED, REFUSED, CONNECT_ERRORS, BYTES_TO_TARGET, BYTES_TO_CLIENT, CLOSED,
     then two histograms, each as per-bucket counts (bucket i counts observations
     <= bounds[i], the last bucket +Inf) followed by the sum of observations in ns.
 43-47 unused
 48  SESSIONS_ACTIVE     datagram sessions open now   worker (a gauge: read only for
                                                      live slots, though folded too)
 49- datagram counters, monotonic totals folded like the others: SESSIONS (opened),
     DATAGRAMS_TO_TARGET, DATAGRAMS_TO_CLIENT, DATAGRAM_BYTES_TO_TARGET,
     DATAGRAM_BYTES_TO_CLIENT, then datagrams dropped by reason (DROPPED_BY_REASON).
"""

import enum
import mmap
from collections.abc import Sequence

PID = 0
GENERATION = 1
STATE = 2
HEARTBEAT_NS = 3
STARTED_NS = 4
LAST_ACTIVITY_NS = 5
ACTIVE = 6

FIRST_COUNTER = 7
ACCEPTED = 7
REFUSED = 8
CONNECT_ERRORS = 9
BYTES_TO_TARGET = 10
BYTES_TO_CLIENT = 11
CLOSED = 12

# Seconds to connect to the target, and lifetime of relayed connections.
CONNECT_DURATION_BOUNDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
CONNECTION_DURATION_BOUNDS: tuple[float, ...] = (
    0.001,
    0.01,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
    3600.0,
)
CONNECT_DURATION_BUCKETS = 13
CONNECT_DURATION_SUM_NS = CONNECT_DURATION_BUCKETS + len(CONNECT_DURATION_BOUNDS) + 1
CONNECTION_DURATION_BUCKETS = CONNECT_DURATION_SUM_NS + 1
CONNECTION_DURATION_SUM_NS = CONNECTION_DURATION_BUCKETS + len(CONNECTION_DURATION_BOUNDS) + 1

# Datagram listeners (relay/datagram.py).
SESSIONS_ACTIVE = 48
SESSIONS = 49
DATAGRAMS_TO_TARGET = 50
DATAGRAMS_TO_CLIENT = 51
DATAGRAM_BYTES_TO_TARGET = 52
DATAGRAM_BYTES_TO_CLIENT = 53
DROPPED_CAP = 54  # a new client's datagram at the connection cap
DROPPED_PER_SOURCE = 55  # ... at its source's cap (--max-connections-per-source)
DROPPED_SEND_ERROR = 56  # the kernel refused to send it (ICMP error, EMSGSIZE, ENOBUFS)
DROPPED_TRUNCATED = 57  # larger than the worker's buffer: never sent cut short
DROPPED_NO_SESSION = 58  # no session could be opened (no socket, target unreachable)
# Drop reasons as metrics label them, and their words.
DROPPED_BY_REASON = {
    "cap": DROPPED_CAP,
    "per_source": DROPPED_PER_SOURCE,
    "send_error": DROPPED_SEND_ERROR,
    "truncated": DROPPED_TRUNCATED,
    "no_session": DROPPED_NO_SESSION,
}

SLOT_WORDS = 64
assert CONNECTION_DURATION_SUM_NS < SESSIONS_ACTIVE and DROPPED_NO_SESSION < SLOT_WORDS

_WORD = 8


class SlotState(enum.IntEnum):
    FREE = 0  # no process owns the slot
    STARTING = 1  # forked, not yet accepting
    SERVING = 2  # accepting connections
    DRAINING = 3  # stopped accepting; finishing open connections


class Scoreboard:
    """The shared slots, plus the master's private totals of retired workers."""

    def __init__(self, slot_count: int) -> None:
        self.slot_count = slot_count
        self._memory = mmap.mmap(-1, slot_count * SLOT_WORDS * _WORD, flags=mmap.MAP_SHARED)
        self._words = memoryview(self._memory).cast("q")
        # Master only: counters of workers that have died, per slot.
        self._retired = [[0] * SLOT_WORDS for _ in range(slot_count)]

    def slot(self, index: int) -> memoryview:
        """The words of slot `index`, for its owner to write with `slot[FIELD] += n`."""
        start = index * SLOT_WORDS
        return self._words[start : start + SLOT_WORDS]

    def get(self, index: int, field: int) -> int:
        return self._words[index * SLOT_WORDS + field]

    def prepare(self, index: int, generation: int, started_ns: int) -> None:
        """Master, before forking a worker into a free slot."""
        start = index * SLOT_WORDS
        self._words[start : start + SLOT_WORDS] = memoryview(bytes(SLOT_WORDS * _WORD)).cast("q")
        self._words[start + GENERATION] = generation
        self._words[start + STARTED_NS] = started_ns
        self._words[start + HEARTBEAT_NS] = started_ns
        self._words[start + STATE] = SlotState.STARTING

    def retire(self, index: int) -> None:
        """Master, after reaping the slot's worker: keep its counters, free the slot."""
        start = index * SLOT_WORDS
        retired = self._retired[index]
        for field in range(FIRST_COUNTER, SLOT_WORDS):
            retired[field] += self._words[start + field]
        self._words[start : start + SLOT_WORDS] = memoryview(bytes(SLOT_WORDS * _WORD)).cast("q")

    def counter(self, index: int, field: int) -> int:
        """A slot's counter including every worker that ever ran in it."""
        return self._retired[index][field] + self._words[index * SLOT_WORDS + field]

    def total(self, field: int) -> int:
        """A counter summed over all slots, past and present."""
        return sum(self.counter(index, field) for index in range(self.slot_count))

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
        try:
            self._words.release()
            self._memory.close()
        except BufferError:
            pass  # a slot view is still referenced; the mapping goes when it does
