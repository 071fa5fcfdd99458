"""The master's worker processes: spawn, reap, respawn with backoff, kill the hung.

A `WorkerProcess` record per live worker, a respawn deadline per slot; the master's loop
waits on `next_deadline()`. Forking happens here only; `respawn.RespawnPolicy` says when
a replacement starts and when to give up (`on_fatal`), `ranks.Ranks` what datagram
listeners a new worker reads. How many workers of which generation are wanted is
`pool.WorkerPool`'s, built on this. Never relays bytes; never decides to shut down.
"""

import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Collection

from forkproxy.relay.worker import run_worker
from forkproxy.settings.timespan import format_timespan
from forkproxy.shared.protocol import EXIT_CANNOT_START, WorkerSpec
from forkproxy.shared.scoreboard import HEARTBEAT_NS
from forkproxy.supervisor.ranks import Ranks
from forkproxy.supervisor.respawn import (
    CRASH_WINDOW,
    STABLE_AFTER,
    RespawnPolicy,
    describe_exit,
    died_on_its_own,
)
from forkproxy.supervisor.worker_record import WorkerProcess

log = logging.getLogger("forkproxy")

KILL_MARGIN = 2.0  # after the graceful timeout, how long before workers are SIGKILLed
# A worker whose heartbeat is older than this many heartbeat intervals is not counted as
# serving (/healthz, STATUS=, WATCHDOG=1); it is killed only after --worker-timeout.
STALE_HEARTBEATS = 3


class WorkerProcesses:
    """The live workers by pid: fork, reap, replace the dead, kill the hung and the late."""

    def __init__(
        self,
        spec: WorkerSpec,
        blocked_signals: Collection[int],
        in_child: Callable[[], None],
        on_fatal: Callable[[str], None],
    ) -> None:
        self.spec = spec  # every new worker's, with its own slot and generation
        self.heartbeat_interval = spec.heartbeat_interval  # the workers'
        self.config = spec.config
        self.scoreboard = spec.scoreboard
        self.blocked_signals = blocked_signals  # the master's: held back across fork
        self.in_child = in_child  # runs first in a new worker: close what only the master uses
        self.on_fatal = on_fatal  # workers cannot be kept running: the master stops
        self.workers: dict[int, WorkerProcess] = {}  # by pid
        self.respawn_at: dict[int, float] = {}  # slot -> when to start its replacement
        self.policy = RespawnPolicy()
        self.generation = 0  # of the workers started now
        self.restarts = 0
        self.stopping = False
        self.last_exit = 0.0  # monotonic time a worker last exited (its connections ended)
        # A child that is not a worker exited (pid, wait status): a reload's check.
        self.on_other_exit: Callable[[int, int], None] = _ignore_exit
        datagram_listeners = sum(1 for listener in spec.listeners if listener.is_datagram)
        self.ranks = Ranks(self.config.workers, datagram_listeners)

    def current(self) -> list[WorkerProcess]:
        """The workers of the newest generation."""
        return [w for w in self.workers.values() if w.generation == self.generation]

    def responsive(self, worker: WorkerProcess, now: float) -> bool:
        """Whether `worker` ran its event loop within STALE_HEARTBEATS heartbeat intervals."""
        beat = self.scoreboard.get(worker.slot, HEARTBEAT_NS) / 1e9
        return not worker.killed and beat >= now - STALE_HEARTBEATS * self.heartbeat_interval

    # -- spawning and reaping ------------------------------------------------------------

    def spawn(self, slot: int) -> None:
        self.scoreboard.prepare(slot, self.generation, time.monotonic_ns())
        rank, size = self.ranks.assign(slot), self.ranks.size
        spec = dataclasses.replace(
            self.spec, slot=slot, generation=self.generation, rank=rank, generation_size=size
        )
        # Signals stay blocked across fork: a signal for the new worker must neither run
        # the master's handler in it (which would report it on the master's wakeup fd) nor
        # be lost; the worker unblocks once its own loop handles them. The master gets
        # back the mask it had: a reload about to exec keeps them blocked.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.blocked_signals)
        try:
            pid = os.fork()
        except OSError as error:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            log.error("cannot start worker %d: %s", slot, error)
            self._schedule_respawn(slot, early=True)
            return
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        else:
            status = 70  # EX_SOFTWARE: a bug escaped the worker
            try:
                self.in_child()
                status = run_worker(spec)
            except BaseException:
                log.exception("worker %d crashed", slot)
            finally:
                os._exit(status)
        self.workers[pid] = WorkerProcess(slot, pid, self.generation)
        log.debug("started worker %d (pid %d)", slot, pid)

    def reap(self) -> None:
        """On SIGCHLD: every child that exited, workers or not (others are reaped quietly)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._on_exit(worker, status)
            else:
                self.on_other_exit(pid, status)

    def _on_exit(self, worker: WorkerProcess, status: int) -> None:
        self.last_exit = time.monotonic()  # its connections, if any, just ended
        self.spec.admission.reclaim(worker.slot)  # its units of the caps come back
        self.scoreboard.retire(worker.slot)
        how = describe_exit(status)
        if self.stopping or worker.stopping:
            log.debug("worker %d (pid %d) %s", worker.slot, worker.pid, how)
            return
        if os.waitstatus_to_exitcode(status) == EXIT_CANNOT_START:
            log.error("worker %d could not start, stopping", worker.slot)
            self.on_fatal("a worker could not start")
            return
        now = time.monotonic()
        early = not worker.ready or now - worker.started < STABLE_AFTER
        if early and died_on_its_own(status, worker.hung) and self.policy.crash_loop(now):
            log.error(
                "workers keep dying (%d crashes within %gs of starting, last: worker %d %s), "
                "giving up",
                len(self.policy.early_deaths),
                CRASH_WINDOW,
                worker.slot,
                how,
            )
            self.on_fatal("workers keep dying")
            return
        if worker.generation != self.generation:
            log.warning("worker %d (pid %d) %s", worker.slot, worker.pid, how)
            return  # a rotation is replacing it already
        log.warning("worker %d (pid %d) %s, starting a replacement", worker.slot, worker.pid, how)
        self._schedule_respawn(worker.slot, early)

    def _schedule_respawn(self, slot: int, early: bool) -> None:
        self.respawn_at[slot] = time.monotonic() + self.policy.delay(slot, early)

    # -- deadlines: respawn, kill, heartbeat -------------------------------------------------

    def next_deadline(self) -> float:
        deadlines = list(self.respawn_at.values())
        for worker in self.workers.values():
            deadlines.append(worker.kill_deadline)
            deadlines.append(self._heartbeat_deadline(worker))
        return min(deadlines, default=math.inf)

    def run_deadlines(self, now: float) -> None:
        for slot, when in list(self.respawn_at.items()):
            if now >= when:
                del self.respawn_at[slot]
                self.restarts += 1
                self.spawn(slot)
        for worker in list(self.workers.values()):
            if now >= worker.kill_deadline:
                log.warning(
                    "worker %d (pid %d) did not stop within %s, killing it",
                    worker.slot,
                    worker.pid,
                    format_timespan(self.config.graceful_timeout),
                )
                worker.kill()
            elif now >= self._heartbeat_deadline(worker):
                log.warning(
                    "worker %d (pid %d) has not run its event loop for %s, killing it",
                    worker.slot,
                    worker.pid,
                    format_timespan(self.config.worker_timeout),
                )
                worker.hung = True
                worker.kill()

    def _heartbeat_deadline(self, worker: WorkerProcess) -> float:
        if worker.killed:
            return math.inf
        beat = self.scoreboard.get(worker.slot, HEARTBEAT_NS) / 1e9
        return beat + self.config.worker_timeout

    # -- stopping ------------------------------------------------------------------------

    def _stop_worker(self, worker: WorkerProcess) -> None:
        """Ask one worker to stop accepting and drain; kill it if it takes too long."""
        worker.stopping = True
        worker.kill_deadline = time.monotonic() + self.config.graceful_timeout + KILL_MARGIN
        worker.send(signal.SIGTERM)

    def stop_all(self) -> None:
        """Shutdown: no more respawns; every worker stops accepting and drains."""
        self.stopping = True
        self.respawn_at.clear()
        for worker in self.workers.values():
            if not worker.stopping:
                worker.stopping = True
                worker.send(signal.SIGTERM)

    def kill_all(self, reason: str) -> None:
        if self.workers:
            log.warning("%s: killing %d workers", reason, len(self.workers))
        for worker in self.workers.values():
            worker.kill()


def _ignore_exit(pid: int, status: int) -> None:
    """Children that are not workers are reaped quietly."""
