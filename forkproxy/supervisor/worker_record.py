"""`WorkerProcess`: the master's record of one live worker process, and its signals.

Its slot (the worker's identity), pid, generation and what the master knows of its life:
ready, asked to stop, killed. Holds no policy: `workers` decides what happens to it.
"""

import contextlib
import math
import os
import signal
import time


class WorkerProcess:
    """The master's record of one live worker process."""

    __slots__ = (
        "slot",
        "pid",
        "generation",
        "started",
        "ready",
        "stopping",
        "killed",
        "hung",
        "kill_deadline",
    )

    def __init__(self, slot: int, pid: int, generation: int) -> None:
        self.slot = slot
        self.pid = pid
        self.generation = generation
        self.started = time.monotonic()
        self.ready = False
        self.stopping = False  # asked to stop: its exit is expected, not replaced
        self.killed = False  # SIGKILLed by us; waiting to be reaped
        self.hung = False  # killed because its heartbeat stopped
        self.kill_deadline = math.inf  # SIGKILL if still alive then

    def kill(self) -> None:
        self.killed = True
        self.kill_deadline = math.inf
        self.send(signal.SIGKILL)

    def send(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # dead, not yet reaped
            os.kill(self.pid, signum)
