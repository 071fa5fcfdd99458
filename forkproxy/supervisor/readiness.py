"""What the master tells systemd about its workers, and when it has been idle long enough.

READY=1 once every current worker serves (sd_notify(3)), STATUS= with a short line
(`2 workers, 0 active, 0 refused, targets 3/3 up`) when it changes, WATCHDOG=1 while the workers'
heartbeats are fresh, and the --exit-idle-time deadline. Reads the worker records, the
scoreboard and the admission count; never stops anything itself: the master compares
`idle_deadline()` with the clock and begins its shutdown.
"""

import logging
import math
import time

from forkproxy.settings.config import Config
from forkproxy.shared.admission import Admission
from forkproxy.shared.scoreboard import (
    LAST_ACTIVITY_NS,
    REFUSED,
    STATE,
    Scoreboard,
    SlotState,
)
from forkproxy.supervisor.notify import Notifier
from forkproxy.supervisor.pool import WorkerPool
from forkproxy.supervisor.target_health import TargetsView

log = logging.getLogger("forkproxy")

STATUS_INTERVAL = 2.0


class Readiness:
    """READY, STATUS and WATCHDOG for the master, and its idle deadline."""

    def __init__(
        self,
        config: Config,
        notifier: Notifier,
        watchdog_interval: float | None,
        pool: WorkerPool,
        scoreboard: Scoreboard,
        admission: Admission,
        targets: TargetsView | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier
        self.watchdog_interval = watchdog_interval  # WatchdogSec=, or None
        self.pool = pool
        self.scoreboard = scoreboard
        self.admission = admission
        self.targets = targets
        self.ready_notified = False
        self.idle_since = time.monotonic()
        self.status_text = ""
        self.next_status = 0.0
        self.next_watchdog = 0.0

    def on_serving(self) -> None:
        """Every current worker accepts: READY=1 the first time, then a fresh STATUS=."""
        if not self.ready_notified:
            self.ready_notified = True
            self.idle_since = time.monotonic()
            log.info("ready: %d workers serving", len(self.pool.current()))
            self.notifier.ready(self.status_line())
        self.update_status()

    def next_deadline(self) -> float:
        deadline = self.idle_deadline()
        if self.watchdog_interval is not None:
            deadline = min(deadline, self.next_watchdog)
        if self.notifier.enabled:
            deadline = min(deadline, self.next_status)
        return deadline

    def run_deadlines(self, now: float) -> None:
        """WATCHDOG=1 and STATUS= when due (the idle deadline is the master's to act on)."""
        if self.watchdog_interval is not None and now >= self.next_watchdog:
            if self._heartbeats_fresh(now):
                self.notifier.watchdog()
            self.next_watchdog = now + self.watchdog_interval / 2
        if self.notifier.enabled and now >= self.next_status:
            self.update_status()
            self.next_status = now + STATUS_INTERVAL

    def _heartbeats_fresh(self, now: float) -> bool:
        """Whether every worker not killed ran its loop lately (`WorkerPool.responsive`)."""
        pool = self.pool
        return all(
            pool.responsive(worker, now) for worker in pool.workers.values() if not worker.killed
        )

    def idle_deadline(self) -> float:
        """When to exit for --exit-idle-time, or inf while connections are open."""
        pool = self.pool
        if math.isinf(self.config.exit_idle_time) or pool.stopping or not self.ready_notified:
            return math.inf
        if self.admission.in_use():
            return math.inf  # workers report EVENT_IDLE when their last connection ends
        last = max(self.idle_since, pool.last_exit)
        for worker in pool.workers.values():
            last = max(last, self.scoreboard.get(worker.slot, LAST_ACTIVITY_NS) / 1e9)
        return last + self.config.exit_idle_time

    def status_line(self) -> str:
        now = time.monotonic()
        serving = sum(
            1
            for worker in self.pool.workers.values()
            if self.scoreboard.get(worker.slot, STATE) == SlotState.SERVING
            and self.pool.responsive(worker, now)
        )
        line = (
            f"{serving} workers, {self.admission.in_use()} active, "
            f"{self.scoreboard.total(REFUSED)} refused"
        )
        if self.targets is not None and self.targets.rows.entries:
            counts = self.targets.rows.usable_counts().values()
            line += f", targets {sum(up for up, _ in counts)}/{sum(n for _, n in counts)} up"
        return line

    def update_status(self) -> None:
        if self.pool.stopping or not self.notifier.enabled:
            return
        text = self.status_line()
        if text != self.status_text:
            self.status_text = text
            self.notifier.status(text)
