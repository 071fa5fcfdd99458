"""The master's worker processes: spawn, reap, respawn with backoff, rotation, scaling.

A `WorkerProcess` record per live worker, a respawn deadline per slot; the master's loop
waits on `next_deadline()`. Forking happens here only; `respawn.RespawnPolicy` says when
a replacement starts and when to give up (`on_fatal`), `ranks.Ranks` what datagram
listeners a new worker reads. Signals change only what is wanted (`target_workers`,
`rotation_wanted`); `_settle()`, run after each, and after each exit and READY, moves the
processes towards it, so the count converges after any storm of SIGHUP, SIGTTIN and
SIGTTOU. One generation starts at a time (SIGHUPs during a rotation start one more after
it), and only with free slots: there are 2 x MAX_WORKERS, so old workers leaving always
make room. Never relays bytes; never decides to shut down.
"""

import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Collection

from forkproxy.relay.worker import run_worker
from forkproxy.settings.config import MAX_WORKERS
from forkproxy.settings.timespan import format_timespan
from forkproxy.shared.listener import Listener
from forkproxy.shared.protocol import EXIT_CANNOT_START, WorkerSpec
from forkproxy.shared.scoreboard import HEARTBEAT_NS, PID
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
        # be lost; the worker unblocks once its own loop handles them.
        signal.pthread_sigmask(signal.SIG_BLOCK, self.blocked_signals)
        try:
            pid = os.fork()
        except OSError as error:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.blocked_signals)
            log.error("cannot start worker %d: %s", slot, error)
            self._schedule_respawn(slot, early=True)
            return
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.blocked_signals)
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


class WorkerPool(WorkerProcesses):
    """The workers, and what is wanted of them: how many, and of which generation.

    What metrics read of supervision (`metrics.collector.MasterView`): `workers`,
    `generation`, `target_workers`, `restarts`, `stopping`, `heartbeat_interval`.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        blocked_signals: Collection[int],
        in_child: Callable[[], None],
        on_fatal: Callable[[str], None],
    ) -> None:
        super().__init__(spec, blocked_signals, in_child, on_fatal)
        self.target_workers = spec.config.workers
        # False from the start of a generation until all its workers serve; the older
        # generations keep accepting until then.
        self.generation_serving = False
        self.rotation_wanted = False  # a SIGHUP waits for the running rotation or for slots
        self.waiting_for_slots = False  # logged once per wait

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """The listeners every worker is handed (what metrics label by)."""
        return self.spec.listeners

    def start(self) -> None:
        self._settle()

    def reap(self) -> None:
        super().reap()
        self._settle()  # slots may be free for what waits for them

    def mark_ready(self, slot: int) -> bool:
        """The worker in `slot` accepts. True when every current worker now does (the
        old generation of a rotation is then asked to stop)."""
        for worker in self.workers.values():
            if worker.slot == slot:
                break
        else:
            return False  # from a worker already gone
        if self.scoreboard.get(slot, PID) != worker.pid:
            return False  # from the slot's previous worker
        worker.ready = True
        return self._settle()

    # -- rotation and scaling (SIGHUP, SIGTTIN, SIGTTOU) ------------------------------------

    def rotate(self) -> None:
        """A new generation starts; the old one drains once the new one serves."""
        if self.stopping:
            return
        if self.rotation_wanted:
            log.info("a rotation is already waiting to start, ignoring SIGHUP")
            return
        self.rotation_wanted = True
        if not self.generation_serving:
            log.info("workers are starting: rotating them once they serve")
        self._settle()

    def add_worker(self) -> bool:
        """SIGTTIN: one worker more. True when every current worker serves."""
        if self.stopping:
            return False
        if self.target_workers >= MAX_WORKERS:
            log.warning("already at the most workers (%d), ignoring SIGTTIN", MAX_WORKERS)
            return False
        self.target_workers += 1
        log.info("adding a worker: %d workers", self.target_workers)
        return self._settle()

    def remove_worker(self) -> bool:
        """SIGTTOU: one worker fewer. True when every current worker serves."""
        if self.stopping:
            return False
        if self.target_workers <= 1:
            log.warning("already at one worker, ignoring SIGTTOU")
            return False
        self.target_workers -= 1
        log.info("removing a worker: %d workers", self.target_workers)
        return self._settle()

    def _settle(self) -> bool:
        """Move the workers towards what is wanted; True when every current worker serves.

        Starts or stops workers of the current generation until there are as many as the
        target; once they all serve, asks the older generations to stop, then starts a
        rotation that was asked for meanwhile if enough slots are free.
        """
        if self.stopping:
            return False
        self._converge()
        if not self._current_serving():
            return False
        if not self.generation_serving:
            self.generation_serving = True
            old = [w for w in self.workers.values() if w.generation != self.generation]
            old = [w for w in old if not w.stopping]
            if old:
                log.info("new workers serving; stopping %d old workers", len(old))
            for worker in old:
                self._stop_worker(worker)
        return not (self.rotation_wanted and self._start_rotation())

    def _start_rotation(self) -> bool:
        """Start the wanted rotation if a whole generation's slots are free."""
        free = self.scoreboard.slot_count - len(self.workers)  # respawns are dropped
        if free < self.target_workers:
            if not self.waiting_for_slots:
                self.waiting_for_slots = True
                log.info(
                    "rotation waits for old workers to leave (%d slots free, %d needed)",
                    free,
                    self.target_workers,
                )
            return False
        self.rotation_wanted = False
        self.waiting_for_slots = False
        self.generation += 1
        self.generation_serving = False
        self.respawn_at.clear()
        self.ranks.new_generation(self.target_workers)
        log.info("rotating workers: starting %d new workers", self.target_workers)
        self._converge()
        return True

    def _converge(self) -> None:
        """Start or stop current workers until they (and pending respawns) meet the target."""
        active = [w for w in self.current() if not w.stopping]
        missing = self.target_workers - len(active) - len(self.respawn_at)
        if missing > 0:
            free = self._free_slots()
            if len(free) < missing:
                log.debug("%d workers wait for old workers to leave", missing - len(free))
            for slot in free[:missing]:
                self.spawn(slot)
            return
        for _ in range(-missing):
            if self.respawn_at:
                slot = max(self.respawn_at)
                del self.respawn_at[slot]
            else:  # not yet serving first, then the highest slot
                worker = max(active, key=lambda w: (not w.ready, w.slot))
                active.remove(worker)
                self._stop_worker(worker)
                slot = worker.slot
            if self.ranks.free(slot) and not self.rotation_wanted:
                log.info("a datagram listener lost its worker: rotating the workers")
                self.rotation_wanted = True

    def _current_serving(self) -> bool:
        active = [w for w in self.current() if not w.stopping and not w.killed]
        return len(active) == self.target_workers and all(w.ready for w in active)

    def _free_slots(self) -> list[int]:
        used = {worker.slot for worker in self.workers.values()} | set(self.respawn_at)
        return [slot for slot in range(self.scoreboard.slot_count) if slot not in used]
