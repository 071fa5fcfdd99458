"""The master's worker processes: spawn, reap, respawn with backoff, rotation, scaling.

`WorkerPool` keeps a `WorkerProcess` record per live worker and a respawn deadline per
slot waiting for a replacement; the master's loop waits on `next_deadline()` and calls
`run_deadlines()`. Forking happens here and nowhere else. A worker that dies early is
replaced after a delay that doubles to BACKOFF_MAX, and CRASH_LIMIT early deaths within
CRASH_WINDOW end the master (through `on_fatal`), so systemd's Restart= takes over
instead of a fork storm. Never relays bytes and never decides about shutdown itself.
"""

import collections
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
from forkproxy.shared.protocol import EXIT_CANNOT_START, WorkerSpec
from forkproxy.shared.scoreboard import HEARTBEAT_NS, PID

log = logging.getLogger("forkproxy")

# Crash-loop policy: a worker that dies before it has served for STABLE_AFTER seconds
# died "early"; CRASH_LIMIT early deaths within CRASH_WINDOW seconds end the master,
# so systemd's Restart= takes over instead of a fork storm.
STABLE_AFTER = 5.0
CRASH_LIMIT = 5
CRASH_WINDOW = 10.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
KILL_MARGIN = 2.0  # after the graceful timeout, how long before workers are SIGKILLed


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
        self.kill_deadline = math.inf  # SIGKILL if still alive then

    def kill(self) -> None:
        self.killed = True
        self.kill_deadline = math.inf
        _kill(self.pid, signal.SIGKILL)


class RespawnPolicy:
    """When a dead worker's replacement starts, and when to stop replacing workers."""

    def __init__(self) -> None:
        self.backoff: dict[int, float] = {}  # slot -> delay before its next replacement
        self.early_deaths: collections.deque[float] = collections.deque()

    def delay(self, slot: int, early: bool) -> float:
        """Seconds before `slot`'s replacement starts: doubling to BACKOFF_MAX while its
        workers die early, none after a worker that had served a stable spell."""
        if early:
            delay = min(BACKOFF_MAX, self.backoff.get(slot, BACKOFF_FIRST / 2) * 2)
            self.backoff[slot] = delay
            return delay
        self.backoff.pop(slot, None)
        return 0.0

    def crash_loop(self, now: float) -> bool:
        """Count an early death at `now`; True once CRASH_LIMIT fall within CRASH_WINDOW."""
        self.early_deaths.append(now)
        while self.early_deaths and self.early_deaths[0] < now - CRASH_WINDOW:
            self.early_deaths.popleft()
        return len(self.early_deaths) >= CRASH_LIMIT


class WorkerPool:
    """The live workers by pid, and the slots waiting for a replacement.

    What metrics read of supervision (`metrics.collector.MasterView`): `workers`,
    `generation`, `target_workers`, `restarts`, `stopping`.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        blocked_signals: Collection[int],
        in_child: Callable[[], None],
        on_fatal: Callable[[str], None],
    ) -> None:
        self.spec = spec  # every new worker's, with its own slot and generation
        self.config = spec.config
        self.scoreboard = spec.scoreboard
        self.blocked_signals = blocked_signals  # the master's: held back across fork
        self.in_child = in_child  # runs first in a new worker: close what only the master uses
        self.on_fatal = on_fatal  # workers cannot be kept running: the master stops
        self.workers: dict[int, WorkerProcess] = {}  # by pid
        self.respawn_at: dict[int, float] = {}  # slot -> when to start its replacement
        self.policy = RespawnPolicy()
        self.generation = 0
        self.target_workers = spec.config.workers
        self.restarts = 0
        self.rotating = False
        self.stopping = False
        self.last_exit = 0.0  # monotonic time a worker last exited (its connections ended)

    def start(self) -> None:
        for slot in range(self.target_workers):
            self.spawn(slot)

    def current(self) -> list[WorkerProcess]:
        """The workers of the newest generation."""
        return [w for w in self.workers.values() if w.generation == self.generation]

    # -- spawning and reaping ------------------------------------------------------------

    def spawn(self, slot: int) -> None:
        self.scoreboard.prepare(slot, self.generation, time.monotonic_ns())
        spec = dataclasses.replace(self.spec, slot=slot, generation=self.generation)
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
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._on_exit(worker, status)

    def _on_exit(self, worker: WorkerProcess, status: int) -> None:
        self.last_exit = time.monotonic()  # its connections, if any, just ended
        self.spec.admission.reclaim(worker.slot)  # its units of the caps come back
        self.scoreboard.retire(worker.slot)
        how = _describe_exit(status)
        if self.stopping or worker.stopping:
            log.debug("worker %d (pid %d) %s", worker.slot, worker.pid, how)
            return
        if os.waitstatus_to_exitcode(status) == EXIT_CANNOT_START:
            log.error("worker %d could not start, stopping", worker.slot)
            self.on_fatal("a worker could not start")
            return
        now = time.monotonic()
        early = not worker.ready or now - worker.started < STABLE_AFTER
        if early and self.policy.crash_loop(now):
            log.error(
                "workers keep dying (%d deaths within %gs of starting, last: worker %d %s), "
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
        if self.stopping:
            return False
        current = self.current()
        if len(current) < self.target_workers or not all(w.ready for w in current):
            return False
        if self.rotating:
            self.rotating = False
            old = [w for w in self.workers.values() if w.generation != self.generation]
            log.info("new workers serving; stopping %d old workers", len(old))
            for worker in old:
                self._stop_worker(worker)
        return True

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
                worker.kill()

    def _heartbeat_deadline(self, worker: WorkerProcess) -> float:
        if worker.killed:
            return math.inf
        beat = self.scoreboard.get(worker.slot, HEARTBEAT_NS) / 1e9
        return beat + self.config.worker_timeout

    # -- rotation and scaling (SIGHUP, SIGTTIN, SIGTTOU) ------------------------------------

    def rotate(self) -> None:
        """A new generation starts; the old one drains once the new one serves."""
        if self.stopping:
            return
        self.generation += 1
        self.rotating = True
        self.respawn_at.clear()
        log.info("rotating workers: starting %d new workers", self.target_workers)
        free = self._free_slots()
        for slot in free[: self.target_workers]:
            self.spawn(slot)

    def add_worker(self) -> None:
        if self.stopping:
            return
        free = self._free_slots()
        if self.target_workers >= MAX_WORKERS or not free:
            log.warning("already at the most workers (%d), ignoring SIGTTIN", MAX_WORKERS)
            return
        self.target_workers += 1
        log.info("adding a worker: %d workers", self.target_workers)
        self.spawn(free[0])

    def remove_worker(self) -> None:
        if self.stopping:
            return
        if self.target_workers <= 1:
            log.warning("already at one worker, ignoring SIGTTOU")
            return
        self.target_workers -= 1
        current = [w for w in self.current() if not w.stopping]
        pending = [slot for slot in self.respawn_at]
        if pending:
            del self.respawn_at[max(pending)]
        elif current:
            self._stop_worker(max(current, key=lambda w: w.slot))
        log.info("removing a worker: %d workers", self.target_workers)

    def _free_slots(self) -> list[int]:
        used = {worker.slot for worker in self.workers.values()} | set(self.respawn_at)
        return [slot for slot in range(self.scoreboard.slot_count) if slot not in used]

    # -- stopping ------------------------------------------------------------------------

    def _stop_worker(self, worker: WorkerProcess) -> None:
        """Ask one worker to stop accepting and drain; kill it if it takes too long."""
        worker.stopping = True
        worker.kill_deadline = time.monotonic() + self.config.graceful_timeout + KILL_MARGIN
        _kill(worker.pid, signal.SIGTERM)

    def stop_all(self) -> None:
        """Shutdown: no more respawns; every worker stops accepting and drains."""
        self.stopping = True
        self.respawn_at.clear()
        for worker in self.workers.values():
            if not worker.stopping:
                worker.stopping = True
                _kill(worker.pid, signal.SIGTERM)

    def kill_all(self, reason: str) -> None:
        if self.workers:
            log.warning("%s: killing %d workers", reason, len(self.workers))
        for worker in self.workers.values():
            worker.kill()


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # already dead, not yet reaped


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"was killed by signal {signum} ({name})"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
