"""--on-limit=queue: how a worker at the connection cap learns that capacity came back.

Why a helper thread blocked in FUTEX_WAIT
-----------------------------------------
Capacity comes back when any worker releases a connection, or when the master reaps a
worker that died holding some. Each of them, finding WAITERS above 0, changes the
mapping's CAPACITY_SEQ word and wakes its futex waiters (shared/admission.py); a wake-up
message sent by closing workers would be lost with a SIGKILLed one, and a retry timer
either leaves capacity unused for its delay or polls. So a worker that holds a client at
the cap counts itself among the waiters, reads CAPACITY_SEQ, tries to admit once more
and, if that fails, asks its helper thread to FUTEX_WAIT while CAPACITY_SEQ still holds
what it read: a release after the attempt has changed it, so none is missed. The loop
then tries again (`on_wake` through `call_soon_threadsafe`), and whoever is first among
the waiting workers gets the unit.

The thread only waits and calls back: it never admits, since HELD has one writer, the
loop thread. It waits WAIT_SLICE at most, then calls back anyway, which bounds how long a
missed wake (a releaser's store to HELD seen late) could hold a client. It is started
only in queue mode, blocks every signal so they keep going to the loop's thread, and is
a daemon: the worker's exit ends it. The master never starts it (it has no threads, so
forking stays safe). Never logs.
"""

import signal
import threading
from collections.abc import Callable
from typing import Protocol

from forkproxy.shared import futex

WAIT_SLICE = 1.0  # seconds per FUTEX_WAIT, so a stop is seen and a missed wake bounded


class ThreadsafeLoop(Protocol):
    def call_soon_threadsafe(self, callback: Callable[[], None]) -> object: ...


class CapacityWaiter:
    """One outstanding wait at a time: `wait(seq)` after an admit attempt that met the
    cap (`seq` read before it); `on_wake()` runs on the loop when it is worth trying again."""

    def __init__(self, seq_address: int, loop: ThreadsafeLoop, on_wake: Callable[[], None]) -> None:
        self._seq_address = seq_address  # CAPACITY_SEQ in the shared mapping
        self._loop = loop
        self._on_wake = on_wake
        self._wanted = threading.Semaphore(0)
        self._seq = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="capacity-wait", daemon=True)
        self._thread.start()

    def wait(self, seq: int) -> None:
        """Call `on_wake` once CAPACITY_SEQ no longer holds `seq` (or after WAIT_SLICE)."""
        self._seq = seq
        self._wanted.release()

    def stop(self) -> None:
        """No more waits; a wait under way ends within WAIT_SLICE without a call back."""
        self._stopping = True
        self._wanted.release()

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            self._wanted.acquire()
            if self._stopping:
                return
            futex.wait(self._seq_address, self._seq, WAIT_SLICE)
            if self._stopping:
                return
            try:
                self._loop.call_soon_threadsafe(self._on_wake)
            except RuntimeError:  # the loop is closed: the worker is exiting
                return
