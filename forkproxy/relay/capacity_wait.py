"""--on-limit=queue: how a worker at the connection cap learns that capacity came back.

Why a helper thread blocked in semtimedop(2)
--------------------------------------------
Capacity comes back when any worker closes a connection, or when the kernel undoes the
tokens of a worker that died (SEM_UNDO). Nothing tells the other workers: a wake-up
message sent by closing workers would be lost with a SIGKILLed one, and a retry timer
either leaves capacity unused for its delay (at the cap, throughput falls to one
connection per delay) or polls. A blocking semop is woken by the kernel on every
increase of the semaphore, whoever made it, and hands the unit over atomically, with
SEM_UNDO, to exactly one waiter (FIFO among the workers' threads). So each worker that
meets the cap starts one wait on its helper thread; the loop gets the token through
`call_soon_threadsafe` and serves the client it holds.

The thread only ever runs `Admission.wait_acquire` (ctypes drops the GIL while it
blocks) and `call_soon_threadsafe`. It is started only in queue mode, blocks every
signal so they keep going to the loop's thread, and is a daemon: the worker's exit ends
it, and the kernel returns a token it held. The master never starts it (it has no
threads, so forking stays safe). Never logs.
"""

import signal
import threading
from collections.abc import Callable
from typing import Protocol

from forkproxy.shared.admission import NO_TOKEN, Admission

WAIT_SLICE = 1.0  # seconds per semtimedop, so a stop request is seen within one


class ThreadsafeLoop(Protocol):
    def call_soon_threadsafe(self, callback: Callable[[int], None], token: int) -> object: ...


class CapacityWaiter:
    """One outstanding wait at a time: `request()` after meeting the cap; `on_token(token)`
    runs on the loop once a unit is ours."""

    def __init__(
        self, admission: Admission, loop: ThreadsafeLoop, on_token: Callable[[int], None]
    ) -> None:
        self._admission = admission
        self._loop = loop
        self._on_token = on_token
        self._wanted = threading.Semaphore(0)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="capacity-wait", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Start waiting for one unit of capacity."""
        self._wanted.release()

    def stop(self) -> None:
        """No more waits; a wait under way ends within WAIT_SLICE without a token."""
        self._stopping = True
        self._wanted.release()

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        admission = self._admission
        while True:
            self._wanted.acquire()
            token = NO_TOKEN
            while token == NO_TOKEN and not self._stopping:
                token = admission.wait_acquire(WAIT_SLICE)
            if token < 0:  # stopping, or GONE: the set was removed
                return
            if self._stopping:
                admission.release(token)
                return
            try:
                self._loop.call_soon_threadsafe(self._on_token, token)
            except RuntimeError:  # the loop is closed: the worker is exiting
                admission.release(token)
                return
