"""--max-connections-per-source=N: at most N connections per client IP, across all workers.

How the limit is exact
----------------------
Like the global cap (`admission.py`), the counts live in a SysV semaphore set whose
operations use SEM_UNDO, so the kernel, not a process, keeps them: a SIGKILLed worker's
connections are returned at the instant it dies. Semaphore 0 is a lock; semaphores
1..M are *entries*, each starting at N. A shared anonymous mapping (created by the master
before forking) holds, per entry, the 16-byte key of the source it serves (IPv4 as
IPv4-mapped IPv6, so a client counts once whichever listener it used):

    offset 0   DIRTY: entry index + 1 being rewritten by the lock holder, else 0
    offset 64  M keys of 16 bytes; all zeros: never used; all ones: cleared

An entry is *in use* while its semaphore is below N. Invariants, kept under the lock:
a key appears in at most one entry, and the key of an in-use entry never changes.
So all of a source's connections hold units of the one entry with its key, and that
semaphore (never below 0) admits at most N of them.

Admitting a client from source S: take the lock; find S's entry (a C-speed search of
the keys), or claim an entry that is not in use (one GETALL) and write S into it; then
one semop that both takes a unit of the entry (IPC_NOWAIT) and releases the lock, so
nothing can happen in between. EAGAIN means S already has N. Releasing is one
semop(+1) on the entry, without the lock: it can only make an entry less used.

Why a dead process cannot break it: the lock is taken with SEM_UNDO, so the kernel
releases it when its holder dies. The holder changes shared memory only to claim an
entry that is not in use, marking DIRTY first; the next lock holder finding DIRTY set
overwrites that entry's possibly torn key with all ones (a key no client has). The
entry is not in use (its claimer's units, if any, went back when it died), so nothing
is lost, and a torn key can never duplicate a live one. The lock is taken with a
timeout: a holder stopped by a signal makes others refuse rather than block their loop.

A listener with a lower limit of its own (`try_acquire(key, limit)`) reads the entry's
count under the lock before taking a unit: only lock holders take units, so the count
cannot grow between the read and the take, and the limit is as exact. A source's count
is one across listeners; each listener compares it with its own limit.

At most `connections_max` connections are admitted globally (that is checked first),
so with M = connections_max entries there is always a free one: the limit never refuses
a source below N. SEMMSL (32000 semaphores per set) bounds M; past it, at most that
many distinct sources can be connected at once and the next new one is refused.

Clients without an IP address (unix sockets, vsock) are not limited. Never logs.
"""

import ctypes
import errno
import mmap
import socket

from forkproxy.shared.admission import NO_TOKEN, SEMVMX
from forkproxy.shared.sysv import GETALL as _GETALL
from forkproxy.shared.sysv import GETVAL as _GETVAL
from forkproxy.shared.sysv import IPC_CREAT as _IPC_CREAT
from forkproxy.shared.sysv import IPC_NOWAIT as _IPC_NOWAIT
from forkproxy.shared.sysv import IPC_PRIVATE as _IPC_PRIVATE
from forkproxy.shared.sysv import IPC_RMID as _IPC_RMID
from forkproxy.shared.sysv import SEM_UNDO as _SEM_UNDO
from forkproxy.shared.sysv import SETALL as _SETALL
from forkproxy.shared.sysv import SemBuf as _SemBuf
from forkproxy.shared.sysv import Timespec as _Timespec
from forkproxy.shared.sysv import last_error as _oserror
from forkproxy.shared.sysv import semctl as _semctl
from forkproxy.shared.sysv import semget as _semget
from forkproxy.shared.sysv import semop as _semop
from forkproxy.shared.sysv import semtimedop as _semtimedop

BUSY = -2  # the table's lock could not be had in LOCK_TIMEOUT: refuse, do not block

LOCK_TIMEOUT = 0.05
KEY_SIZE = 16
HEADER_SIZE = 64
EMPTY_KEY = bytes(KEY_SIZE)
CLEARED_KEY = b"\xff" * KEY_SIZE  # ff00::/8 is multicast: never a TCP client
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_SEMMSL_DEFAULT = 32000


def source_key(family: int, peer: object) -> bytes | None:
    """The 16-byte key of a client's IP address, or None for a client without one."""
    if family == socket.AF_INET and isinstance(peer, tuple):
        return _MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, peer[0])
    if family == socket.AF_INET6 and isinstance(peer, tuple):
        host: str = peer[0]
        return socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    return None


def entries_for(connections_max: int) -> int:
    """How many entries a table for `connections_max` connections gets (see above)."""
    return max(1, min(connections_max, _semmsl() - 1))


class SourceLimit:
    """At most `per_source` units held per source key, by all processes together (or a
    lower limit, per call).

    Created once by the master before forking; every worker uses the same set and table.
    """

    __slots__ = (
        "per_source",
        "entries",
        "_semid",
        "_memory",
        "_words",
        "_lock_op",
        "_lock_timeout",
        "_take",
        "_give",
        "_unlock_op",
    )

    def __init__(self, per_source: int, entries: int) -> None:
        if not 1 <= per_source <= SEMVMX:
            raise ValueError(f"per_source must be in 1-{SEMVMX}, got {per_source}")
        self.per_source = per_source
        self.entries = entries
        semid = _semget(_IPC_PRIVATE, entries + 1, _IPC_CREAT | 0o600)
        if semid < 0:
            raise _oserror("semget")
        self._semid = semid
        values = (ctypes.c_ushort * (entries + 1))(1, *([per_source] * entries))
        if _semctl(semid, ctypes.c_int(0), ctypes.c_int(_SETALL), values) < 0:
            error = _oserror("semctl(SETALL)")
            self.remove()
            raise error
        self._memory = mmap.mmap(-1, HEADER_SIZE + entries * KEY_SIZE, flags=mmap.MAP_SHARED)
        self._words = memoryview(self._memory).cast("q")  # word 0: DIRTY
        self._lock_op = ctypes.pointer(_SemBuf(0, -1, _SEM_UNDO))
        self._lock_timeout = ctypes.pointer(
            _Timespec(int(LOCK_TIMEOUT), int(LOCK_TIMEOUT % 1 * 1e9))
        )
        self._unlock_op = ctypes.pointer(_SemBuf(0, 1, _SEM_UNDO))
        # Built once, sem_num set per call (one thread uses them): take a unit of an
        # entry and release the lock in one semop; give a unit back.
        self._take = (_SemBuf * 2)(
            _SemBuf(1, -1, _IPC_NOWAIT | _SEM_UNDO), _SemBuf(0, 1, _SEM_UNDO)
        )
        self._give = ctypes.pointer(_SemBuf(1, 1, _SEM_UNDO))

    def try_acquire(self, key: bytes, limit: int = 0) -> int:
        """Take a unit for source `key`: a token for release(), NO_TOKEN if the source
        has `limit` (0 or more than `per_source`: `per_source`) already, or BUSY if the
        table stayed locked too long.

        Guarantee: at no instant do all processes together hold more than `per_source`
        units for one key, nor does a take with a lower `limit` succeed once the key
        holds `limit`; units held by a process that dies are returned.
        """
        if not self._lock():
            return BUSY
        locked = True
        try:
            words = self._words
            if words[0]:
                self._write_key(words[0] - 1, CLEARED_KEY)  # its claimer died mid-write
                words[0] = 0
            index = self._find(key)
            if index < 0:
                index = self._free_entry()
                if index < 0:
                    return NO_TOKEN
                words[0] = index + 1
                self._write_key(index, key)
                words[0] = 0
            elif 0 < limit < self.per_source:
                value = _semctl(self._semid, ctypes.c_int(index + 1), ctypes.c_int(_GETVAL))
                if value < 0 or self.per_source - value >= limit:
                    return NO_TOKEN
            take = self._take
            take[0].sem_num = index + 1
            while _semop(self._semid, take, 2) < 0:
                code = ctypes.get_errno()
                if code != errno.EINTR:
                    return NO_TOKEN  # EAGAIN: at the limit; EIDRM: stopping
            locked = False  # the same semop released the lock
            return index
        finally:
            if locked:
                self._unlock()

    def release(self, token: int) -> None:
        """Give back the unit `token` stands for."""
        give = self._give
        give.contents.sem_num = token + 1
        while _semop(self._semid, give, 1) < 0:
            if ctypes.get_errno() != errno.EINTR:
                return  # set removed at shutdown

    def in_use(self, key: bytes) -> int:
        """Units held for `key` now, across all processes (for tests and diagnostics)."""
        index = self._find(key)
        if index < 0:
            return 0
        value = _semctl(self._semid, ctypes.c_int(index + 1), ctypes.c_int(_GETVAL))
        return 0 if value < 0 else self.per_source - value

    def remove(self) -> None:
        """Destroy the set; later calls in any process refuse."""
        _semctl(self._semid, ctypes.c_int(0), ctypes.c_int(_IPC_RMID))

    def close(self) -> None:
        """Unmap the table (after `remove`, or in a process that no longer needs it)."""
        try:
            self._words.release()
            self._memory.close()
        except BufferError:
            pass

    # -- under the lock ------------------------------------------------------------------

    def _lock(self) -> bool:
        while _semtimedop(self._semid, self._lock_op, 1, self._lock_timeout) < 0:
            if ctypes.get_errno() != errno.EINTR:
                return False  # EAGAIN: timed out; EIDRM/EINVAL: removed
        return True

    def _unlock(self) -> None:
        while _semop(self._semid, self._unlock_op, 1) < 0:
            if ctypes.get_errno() != errno.EINTR:
                return

    def _find(self, key: bytes) -> int:
        memory = self._memory
        end = HEADER_SIZE + self.entries * KEY_SIZE
        position = memory.find(key, HEADER_SIZE, end)
        while position >= 0 and (position - HEADER_SIZE) % KEY_SIZE:
            position = memory.find(key, position + 1, end)
        return -1 if position < 0 else (position - HEADER_SIZE) // KEY_SIZE

    def _free_entry(self) -> int:
        """An entry no one holds units of, or -1."""
        values = (ctypes.c_ushort * (self.entries + 1))()
        if _semctl(self._semid, ctypes.c_int(0), ctypes.c_int(_GETALL), values) < 0:
            return -1
        try:
            return values[:].index(self.per_source, 1) - 1
        except ValueError:
            return -1

    def _write_key(self, index: int, key: bytes) -> None:
        start = HEADER_SIZE + index * KEY_SIZE
        self._memory[start : start + KEY_SIZE] = key


def _semmsl() -> int:
    try:
        with open("/proc/sys/kernel/sem") as limits:
            return int(limits.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _SEMMSL_DEFAULT
