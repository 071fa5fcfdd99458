"""What is wanted of the workers: how many, and of which generation; rotation, scaling.

Signals change only what is wanted (`target_workers`, `rotation_wanted`); `_settle()`,
run after each, and after each exit and READY, moves the processes towards it, so the
count converges after any storm of SIGTTIN and SIGTTOU. A worker stopped for good frees
its rank (`ranks.Ranks`); if that rank read a datagram listener, a rotation follows. One
generation starts at a time (a rotation asked for during one starts after it), and only
with free slots: there are 2 x MAX_WORKERS, so old workers leaving always make room. A
reload is a re-executed master whose pool adopts the previous image's workers as the old
generation (`adopt`), and gives up a new generation that cannot start (`fall_back`).
Never relays bytes; never decides to shut down.
"""

import logging
from collections.abc import Callable, Collection

from forkproxy.settings.config import MAX_WORKERS
from forkproxy.shared.listener import Listener
from forkproxy.shared.protocol import WorkerSpec
from forkproxy.shared.scoreboard import PID
from forkproxy.supervisor.ranks import Ranks
from forkproxy.supervisor.respawn import RespawnPolicy
from forkproxy.supervisor.worker_record import WorkerProcess
from forkproxy.supervisor.workers import WorkerProcesses

log = logging.getLogger("forkproxy")


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
        # A new generation of the same spec, wanted once the running one serves and a
        # generation's slots are free.
        self.rotation_wanted = False
        self.waiting_for_slots = False  # logged once per wait

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """The listeners every worker is handed (what metrics label by)."""
        return self.spec.listeners

    def start(self) -> bool:
        """Start what is missing; True when every current worker serves already (the
        workers a re-executed master took over)."""
        return self._settle()

    def adopt(self, workers: list[WorkerProcess], generation: int, serving: bool) -> None:
        """A re-executed master: the previous image's workers are ours; `generation` is
        the current one (the previous image's, or a new one to start), `serving` whether
        it serves already."""
        for worker in workers:
            self.workers[worker.pid] = worker
        self.generation = generation
        self.generation_serving = serving

    def can_fall_back(self) -> bool:
        """Whether the current generation has not served yet while an older one still
        does: it can be given up instead of the service."""
        return not self.generation_serving and any(
            w.ready and not w.stopping and not w.killed
            for w in self.workers.values()
            if w.generation != self.generation
        )

    def fall_back(
        self,
        spec: WorkerSpec,
        generation: int,
        target_workers: int,
        ranks: tuple[int, dict[int, int]],
    ) -> None:
        """Give up the current generation (a reload whose workers cannot start): stop it
        and make `generation`, which still serves, current again, respawning with `spec`
        and its `ranks` (size, rank by slot)."""
        for worker in self.current():
            if not worker.stopping:
                self._stop_worker(worker)
        self.spec = spec
        self.config = spec.config
        self.generation = generation
        self.target_workers = target_workers
        self.generation_serving = True
        self.respawn_at.clear()
        self.policy = RespawnPolicy()
        datagram_listeners = sum(1 for listener in spec.listeners if listener.is_datagram)
        self.ranks = Ranks(ranks[0], datagram_listeners)
        self.ranks.restore(*ranks)
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

    # -- scaling (SIGTTIN, SIGTTOU) and rotation -------------------------------------------

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
