"""The global connection cap shared by all workers: a SysV semaphore set with SEM_UNDO.

How the cap is exact
--------------------
The semaphores' values are the free capacity; they start summing to --connections-max=N.
Admitting a connection is one semop(-1, IPC_NOWAIT|SEM_UNDO): the kernel decrements
atomically or fails with EAGAIN, so no interleaving of accepts in any number of workers
can take more than N (we admit while free > 0, never N+1). Closing is semop(+1, SEM_UNDO).

SEM_UNDO makes the kernel keep, per process, the sum of that process's adjustments and
apply its inverse when the process exits, however it exits. A SIGKILLed worker's tokens
therefore return at the instant it dies, with no window between "took a token" and
"recorded that it did" for a kill to fall into (the flaw of an eventfd counter, or of any
count kept in user space), and no lock is ever held that a dead process could leave
locked. fork() does not inherit adjustments, so each worker's are its own.

A semaphore holds at most SEMVMX (32767), so a larger cap is spread over several
semaphores in one set; a token remembers which one it came from.

The master creates the set before forking and removes it at exit (IPC_RMID). A worker
that outlives its master removes it too, so only a simultaneous SIGKILL of every process
can leak it (systemd's RemoveIPC=, implied by DynamicUser=, cleans that up).
"""

import ctypes
import errno

from forkproxy.shared.sysv import GETVAL as _GETVAL
from forkproxy.shared.sysv import IPC_CREAT as _IPC_CREAT
from forkproxy.shared.sysv import IPC_NOWAIT as _IPC_NOWAIT
from forkproxy.shared.sysv import IPC_PRIVATE as _IPC_PRIVATE
from forkproxy.shared.sysv import IPC_RMID as _IPC_RMID
from forkproxy.shared.sysv import SEM_UNDO as _SEM_UNDO
from forkproxy.shared.sysv import SEMVMX
from forkproxy.shared.sysv import SETVAL as _SETVAL
from forkproxy.shared.sysv import SemBuf as _SemBuf
from forkproxy.shared.sysv import Timespec as _Timespec
from forkproxy.shared.sysv import last_error as _oserror
from forkproxy.shared.sysv import semctl as _semctl
from forkproxy.shared.sysv import semget as _semget
from forkproxy.shared.sysv import semop as _semop
from forkproxy.shared.sysv import semtimedop as _semtimedop

NO_TOKEN = -1
GONE = -2  # wait_acquire: the set was removed (the group is stopping)


class Admission:
    """Admits connections while the group holds fewer than `capacity`.

    Created once by the master before forking; every worker uses the same set.
    """

    __slots__ = ("capacity", "_semid", "_takes", "_gives", "_start")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        count = -(-capacity // SEMVMX)
        semid = _semget(_IPC_PRIVATE, count, _IPC_CREAT | 0o600)
        if semid < 0:
            raise _oserror("semget")
        self._semid = semid
        for index in range(count):
            value = min(SEMVMX, capacity - index * SEMVMX)
            if _semctl(semid, ctypes.c_int(index), ctypes.c_int(_SETVAL), ctypes.c_int(value)) < 0:
                error = _oserror("semctl(SETVAL)")
                self.remove()
                raise error
        # Built once: the hot path passes prepared buffers and allocates nothing.
        self._takes = tuple(
            ctypes.pointer(_SemBuf(index, -1, _IPC_NOWAIT | _SEM_UNDO)) for index in range(count)
        )
        self._gives = tuple(ctypes.pointer(_SemBuf(index, 1, _SEM_UNDO)) for index in range(count))
        self._start = 0

    def spread_from(self, index: int) -> None:
        """Start looking for capacity at semaphore `index` (spreads workers over a set)."""
        self._start = index % len(self._takes)

    def try_acquire(self) -> int:
        """Take one unit of capacity: return a token for release(), or NO_TOKEN at the cap.

        Guarantee: at no instant do all processes together hold more than `capacity`
        tokens, and tokens held by a process that dies are returned by the kernel.
        """
        takes = self._takes
        count = len(takes)
        for step in range(count):
            index = (self._start + step) % count
            while _semop(self._semid, takes[index], 1) < 0:
                code = ctypes.get_errno()
                if code == errno.EINTR:
                    continue
                if code == errno.EAGAIN:
                    break
                return NO_TOKEN  # EIDRM/EINVAL: the set was removed, the group is stopping
            else:
                return index
        return NO_TOKEN

    def wait_acquire(self, timeout: float) -> int:
        """Block up to `timeout` seconds for a unit (--on-limit=queue's helper thread):
        a token, NO_TOKEN when the time ran out, or GONE once the set is removed.

        Waits on this process's own semaphore (see `spread_from`); on a timeout it also
        looks once at every other one, so capacity freed anywhere is found. ctypes
        releases the GIL for the wait. The same guarantee as `try_acquire`.
        """
        index = self._start
        take = _SemBuf(index, -1, _SEM_UNDO)
        limit = _Timespec(int(timeout), int(timeout % 1 * 1e9))
        while _semtimedop(self._semid, ctypes.byref(take), 1, ctypes.byref(limit)) < 0:
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue
            if code == errno.EAGAIN:
                return self.try_acquire()
            return GONE
        return index

    def release(self, token: int) -> None:
        """Give back the capacity `token` stands for."""
        while _semop(self._semid, self._gives[token], 1) < 0:
            if ctypes.get_errno() != errno.EINTR:
                return  # set removed at shutdown: nothing left to give back to

    def in_use(self) -> int:
        """Connections admitted and not yet released, across all workers (exact)."""
        free = 0
        for index in range(len(self._takes)):
            value = _semctl(self._semid, ctypes.c_int(index), ctypes.c_int(_GETVAL))
            if value < 0:
                return 0
            free += value
        return self.capacity - free

    def remove(self) -> None:
        """Destroy the set; later calls in any process fail as if at the cap."""
        _semctl(self._semid, ctypes.c_int(0), ctypes.c_int(_IPC_RMID))
