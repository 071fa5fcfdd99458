"""The connection caps, global and per source, kept exact in the shared mapping.

How the caps are exact
----------------------
The truth is per slot and has one writer: a worker's HELD word counts the connections it
admitted and has not released, and its column of the per-source table counts them per
source (per_source.py). Decisions are serialized by one process-shared, robust pthread
mutex in the header, called through ctypes. `admit`: lock; if the sum of HELD over slots
[0, SLOT_HIGH_WATER) is below CAPACITY (and, with a per-source limit, the source's row
sum is below it), count the connection in our own words; unlock. `release`: our words
-= 1 without the lock, after the connection's descriptors are closed. A concurrent
admitter that still reads the old value refuses, which orders that admission before the
release; so at no instant do more than CAPACITY connections hold units, across any
number of workers of either engine (the compiled one follows the same protocol).

What a death does: nothing global can be left inconsistent. A worker killed while
holding the mutex hands it to the next locker with EOWNERDEAD (a robust mutex: the kernel
marks it when the holder dies), who repairs the per-source key it may have torn and
calls pthread_mutex_consistent; counts need no repair. A worker killed while holding
connections keeps its HELD and its column until the master reaps it (`reclaim`), when
the kernel has closed its descriptors: its capacity comes back then, not at the instant
of death; until then the count is high, never low, so the cap is never exceeded.

An event loop never waits on the mutex for long: it tries it, then SPIN_TRIES more times
(a running holder is out within microseconds); a holder still in is most likely
preempted, so it then sleeps on it in the kernel, which lets the holder run, for at most
LOCK_BUDGET, and past that returns REFUSED_BUSY (spinning instead, on a loaded machine,
refused clients while the holder waited for a CPU). A busy mutex is no cap: a stream
worker keeps that client and tries again from its loop (relay/accepting.py), a datagram
worker drops that datagram. A SIGSTOPped holder makes everyone wait until the master's
worker timeout kills it; EOWNERDEAD then hands the lock on. The common path makes no
system call at all.

--on-limit=queue: a worker holding a client at the cap counts itself in WAITERS (and
raises its slot's WAITING flag, so the master can take it back if it dies), reads
CAPACITY_SEQ, tries again, and waits on CAPACITY_SEQ with FUTEX_WAIT (capacity_wait.py).
A releaser that finds WAITERS above 0 increments CAPACITY_SEQ and wakes them, in one
FUTEX_WAKE_OP (futex.py); so does the master after a reap. A worker killed between
counting itself and raising its flag leaves WAITERS one too high: releases then make one
needless wake each; no admission is ever wrong.
"""

import ctypes
import errno
import os
import time

from forkproxy.shared import futex
from forkproxy.shared.layout import (
    CAPACITY,
    CAPACITY_SEQ,
    HELD,
    MAX_SLOTS,
    MUTEX,
    MUTEX_BYTES,
    SLOT_BYTES,
    SLOT_HIGH_WATER,
    SLOT_STRIDE,
    SLOT_WORDS,
    SLOTS,
    SOURCE_LIMIT,
    WAITERS,
    WAITING,
    WORD,
)
from forkproxy.shared.mapping import SharedMapping
from forkproxy.shared.per_source import SourceTable

# What `Admitter.admit` returns besides a per-source row (>= 0).
ADMITTED = -1  # admitted; no per-source row held (no limit, or a client without an address)
REFUSED_CAP = -2  # the global cap is reached
REFUSED_SOURCE = -3  # the client's source has its limit, or the table has no free row
REFUSED_BUSY = -4  # the mutex stayed taken through SPIN_TRIES and LOCK_BUDGET

SPIN_TRIES = 16  # trylocks before sleeping on the mutex: a running holder is done by then
LOCK_BUDGET = 0.05  # seconds: then REFUSED_BUSY rather than stall the event loop longer

_HIGH_WATER = SLOT_HIGH_WATER // WORD  # header word indexes
_CAPACITY = CAPACITY // WORD
_SOURCE_LIMIT = SOURCE_LIMIT // WORD

_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1

_libc = ctypes.CDLL(None, use_errno=True)
_trylock = _libc.pthread_mutex_trylock
_trylock.argtypes = (ctypes.c_void_p,)
_trylock.restype = ctypes.c_int
_unlock = _libc.pthread_mutex_unlock
_unlock.argtypes = (ctypes.c_void_p,)
_unlock.restype = ctypes.c_int
_clocklock = _libc.pthread_mutex_clocklock  # glibc 2.30
_clocklock.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
_clocklock.restype = ctypes.c_int
_consistent = _libc.pthread_mutex_consistent
_consistent.argtypes = (ctypes.c_void_p,)
_consistent.restype = ctypes.c_int


def _u32(mapping: SharedMapping, offset: int) -> memoryview:
    """A one-item uint32 view of the header word at byte `offset`."""
    return memoryview(mapping.memory)[offset : offset + 4].cast("I")


class Admission:
    """The caps in the shared mapping: set up and reclaimed by the master, read by it for
    metrics, and used by each worker through its `Admitter`."""

    def __init__(self, mapping: SharedMapping) -> None:
        self.mapping = mapping
        self.table = SourceTable(mapping)
        self._header = mapping.words
        slots = memoryview(mapping.memory)[SLOTS : SLOTS + MAX_SLOTS * SLOT_BYTES].cast("q")
        self._slots = slots
        self._held = slots[HELD::SLOT_STRIDE]  # every slot's HELD, by slot
        self._waiters = _u32(mapping, WAITERS)
        self.mutex_address = mapping.base + MUTEX
        self.seq_address = mapping.base + CAPACITY_SEQ
        self.waiters_address = mapping.base + WAITERS

    @classmethod
    def set_up(cls, mapping: SharedMapping, capacity: int, per_source: int) -> "Admission":
        """The master, before the first fork: the mutex and the limits. Raises OSError."""
        attr = ctypes.create_string_buffer(MUTEX_BYTES)  # pthread_mutexattr_t fits
        address = ctypes.c_void_p(mapping.base + MUTEX)
        for call, args in (
            (_libc.pthread_mutexattr_init, (attr,)),
            (_libc.pthread_mutexattr_setpshared, (attr, _PTHREAD_PROCESS_SHARED)),
            (_libc.pthread_mutexattr_setrobust, (attr, _PTHREAD_MUTEX_ROBUST)),
            (_libc.pthread_mutex_init, (address, attr)),
        ):
            code = call(*args)
            if code:
                raise OSError(code, f"{call.__name__}: {os.strerror(code)}")
        _libc.pthread_mutexattr_destroy(attr)
        mapping.set_header(CAPACITY, capacity)
        mapping.set_header(SOURCE_LIMIT, per_source)
        return cls(mapping)

    def set_limits(self, capacity: int, per_source: int) -> None:
        """The master: new caps (a reload's), for every worker at once. Waiters hear of
        it: a higher cap may admit them."""
        self.mapping.set_header(CAPACITY, capacity)
        self.mapping.set_header(SOURCE_LIMIT, per_source)
        if self._waiters[0]:
            futex.bump_and_wake(self.seq_address)

    @property
    def capacity(self) -> int:
        return self.mapping.header(CAPACITY)

    @property
    def per_source(self) -> int:
        """The highest --connections-max-per-source of any listener, 0 when off."""
        return self.mapping.header(SOURCE_LIMIT)

    def high_water(self) -> int:
        return min(self._header[SLOT_HIGH_WATER // WORD], MAX_SLOTS)

    def in_use(self) -> int:
        """Connections admitted and not yet released, across all workers (exact)."""
        return sum(self._held[: self.high_water()])

    def source_in_use(self, key: bytes) -> int:
        """Connections of source `key` now, across all workers (tests, diagnostics)."""
        row = self.table.find(key)
        return 0 if row < 0 else self.table.total(row, self.high_water())

    def admitter(self, slot: int) -> "Admitter":
        """What the worker in `slot` admits and releases through."""
        return Admitter(self, slot)

    def reclaim(self, slot: int) -> None:
        """The master, after reaping the worker in `slot` (the kernel has closed its
        descriptors): its units come back, and waiters hear of it."""
        words = self._slots[slot * SLOT_STRIDE : slot * SLOT_STRIDE + SLOT_WORDS]
        if words[WAITING]:
            words[WAITING] = 0
            futex.add(self.waiters_address, -1)
        words[HELD] = 0
        self.table.clear_column(slot)
        if self._waiters[0]:
            futex.bump_and_wake(self.seq_address)


class Admitter:
    """One worker's admissions, in its own slot's words. Used by the worker's loop thread
    only: HELD and its per-source column have this one writer."""

    __slots__ = (
        "admission",
        "slot",
        "_mutex",
        "_header",
        "_held",
        "_high_water",
        "_live_held",
        "_words",
        "_table",
        "_own_counts",
        "_waiters",
        "_seq",
    )

    def __init__(self, admission: Admission, slot: int) -> None:
        self.admission = admission
        self.slot = slot
        self._mutex = admission.mutex_address
        self._header = admission._header
        self._held = admission._held
        self._high_water = 0
        self._live_held = self._held[:0]  # HELD of slots [0, _high_water)
        start = slot * SLOT_STRIDE
        self._words = admission._slots[start : start + SLOT_WORDS]
        self._table = admission.table
        self._own_counts = admission.table.counts_of(slot)
        self._waiters = admission._waiters
        self._seq = _u32(admission.mapping, CAPACITY_SEQ)

    def admit(self, key: bytes | None, limit: int = 0) -> int:
        """Admit one connection from source `key` (None: not limited per source), if the
        source has fewer than `limit` (0: SOURCE_LIMIT) connections, of any listener.

        Returns the per-source row it holds (>= 0) or ADMITTED, both to be passed to
        `release`; or REFUSED_CAP, REFUSED_SOURCE, REFUSED_BUSY. Guarantee: at no instant
        do all processes together hold more than CAPACITY admissions, nor does a source
        get a connection while it holds `limit` (a listener's own limit: the count is
        the source's, across listeners).
        """
        mutex = self._mutex
        code = _trylock(mutex)
        if code and not self._lock_contended(code):
            return REFUSED_BUSY
        try:
            header = self._header
            high_water = header[_HIGH_WATER]
            if high_water > MAX_SLOTS:
                high_water = MAX_SLOTS
            if self.slot >= high_water:
                high_water = self.slot + 1
            if high_water != self._high_water:  # rare: a slot above the others was prepared
                self._high_water = high_water
                self._live_held = self._held[:high_water]
            if sum(self._live_held) >= header[_CAPACITY]:
                return REFUSED_CAP
            row = ADMITTED
            if key is not None:
                if limit <= 0:
                    limit = header[_SOURCE_LIMIT]
                if limit > 0:
                    table = self._table
                    row = table.find_or_claim(key, high_water)
                    if row < 0 or table.total(row, high_water) >= limit:
                        return REFUSED_SOURCE
                    self._own_counts[row] += 1
            self._words[HELD] += 1
            return row
        finally:
            _unlock(mutex)

    def admit_source(self, key: bytes, limit: int) -> int:
        """Count a connection already admitted without a key (`admit(None)`: it holds a
        unit of the global cap) against source `key`, once its address is known (a PROXY
        header carried it), if the source has fewer than `limit` (0: SOURCE_LIMIT).

        Returns the per-source row, which `release` then takes instead of ADMITTED (it
        gives back the unit and the row's count); ADMITTED if no limit applies; or
        REFUSED_SOURCE, REFUSED_BUSY, and the connection keeps only its unit.
        """
        mutex = self._mutex
        code = _trylock(mutex)
        if code and not self._lock_contended(code):
            return REFUSED_BUSY
        try:
            if limit <= 0:
                limit = self._header[_SOURCE_LIMIT]
            if limit <= 0:
                return ADMITTED
            high_water = max(min(self._header[_HIGH_WATER], MAX_SLOTS), self.slot + 1)
            table = self._table
            row = table.find_or_claim(key, high_water)
            if row < 0 or table.total(row, high_water) >= limit:
                return REFUSED_SOURCE
            self._own_counts[row] += 1
            return row
        finally:
            _unlock(mutex)

    def release(self, row: int) -> None:
        """Give back what `admit` returned: call once the connection's fds are closed."""
        if row >= 0:
            self._own_counts[row] -= 1
        self._words[HELD] -= 1
        if self._waiters[0]:
            futex.bump_and_wake(self.admission.seq_address)

    # -- --on-limit=queue (the loop thread; the helper thread only waits) -----------------

    def wait_begin(self) -> None:
        """Count this worker among the waiters (until `wait_end`)."""
        futex.add(self.admission.waiters_address, 1)
        self._words[WAITING] = 1  # after the add: a kill in between only leaves WAITERS high

    def wait_end(self) -> None:
        self._words[WAITING] = 0  # before the sub, for the same reason
        futex.add(self.admission.waiters_address, -1)

    def capacity_seq(self) -> int:
        """CAPACITY_SEQ now: read it before an admit attempt, wait on it after a failed one."""
        return int(self._seq[0])

    # -- the mutex ---------------------------------------------------------------------------

    def _lock(self) -> bool:
        """Take the mutex (tests take it this way to hold it)."""
        code = _trylock(self._mutex)
        return not code or self._lock_contended(code)

    def _lock_contended(self, code: int) -> bool:
        """The first trylock returned `code`: recover, or wait within the budget."""
        mutex = self._mutex
        tries = 0
        while code == errno.EBUSY and tries < SPIN_TRIES:
            tries += 1
            code = _trylock(mutex)
        if code == errno.EBUSY:
            # Held longer than a few admissions take: its holder was likely preempted.
            # Sleep in the kernel, so it gets the CPU, until unlocked or LOCK_BUDGET.
            code = _lock_within(mutex, LOCK_BUDGET)
        if code == 0:
            return True
        if code == errno.EOWNERDEAD:
            # Its holder died inside admit(): counts need no repair (the master zeroes its
            # words when it reaps it), only a key it may have torn.
            self._table.repair()
            _consistent(mutex)
            return True
        return False  # ETIMEDOUT: busy; ENOTRECOVERABLE (never made so here): never guess


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _lock_within(mutex: int, timeout: float) -> int:
    """pthread_mutex_clocklock(3) on CLOCK_MONOTONIC for at most `timeout` seconds: 0,
    EOWNERDEAD, ETIMEDOUT or another error number. ctypes releases the GIL meanwhile."""
    deadline = time.monotonic_ns() + int(timeout * 1e9)
    limit = _Timespec(deadline // 1_000_000_000, deadline % 1_000_000_000)
    return int(_clocklock(mutex, time.CLOCK_MONOTONIC, ctypes.byref(limit)))
