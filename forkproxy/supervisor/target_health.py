"""The target table's rows of the settings the master runs with, and their active checks.

`TargetHealth.set_up` hands each (listener, target) pair of the settings its row of the
shared table (target_rows.py) and starts a `health.Checker` on them. The rows live in
the shared mapping, which a reload's exec keeps: the re-executed master finds every pair
it still has on the row it had, with its counters, its UP and its checks' streak, and
its checker goes on from that state (a target down stays down, an up one up), checking
at once with the new check settings. A pair the reload dropped keeps its row until a new
pair needs it (its draining workers may still count in it). `reset` does the same for
other settings, when a reload falls back to the previous ones. Workers, readiness, the
metrics and /healthz read `rows` and `checker`. Never forks, never logs.
"""

import math
import selectors
from collections.abc import Sequence
from typing import Protocol

from forkproxy.settings.config import Config
from forkproxy.shared.listener import Listener
from forkproxy.shared.mapping import SharedMapping
from forkproxy.shared.scoreboard import Scoreboard
from forkproxy.supervisor.health import Checker
from forkproxy.supervisor.target_rows import TargetRows


class TargetsView(Protocol):
    """What readiness and the metrics read: the rows and the checker running now (a
    reload falling back to the previous settings replaces both)."""

    @property
    def rows(self) -> TargetRows: ...

    @property
    def checker(self) -> Checker: ...


class TargetHealth:
    """The rows of the running settings' targets and the checker of them."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        mapping: SharedMapping,
        scoreboard: Scoreboard,
        rows: TargetRows,
    ) -> None:
        self.selector = selector
        self.mapping = mapping
        self.scoreboard = scoreboard
        self.rows = rows
        self.checker = Checker(selector, rows, mapping)

    @classmethod
    def set_up(
        cls,
        config: Config,
        listeners: Sequence[Listener],
        selector: selectors.BaseSelector,
        mapping: SharedMapping,
        scoreboard: Scoreboard,
    ) -> "TargetHealth":
        rows = TargetRows.set_up(config, listeners, mapping, scoreboard)
        return cls(selector, mapping, scoreboard, rows)

    def reset(self, config: Config, listeners: Sequence[Listener]) -> None:
        """Rows and checks for other settings (a reload falling back to the previous
        ones); the pairs these have keep their rows and health."""
        rows = TargetRows.set_up(config, listeners, self.mapping, self.scoreboard)
        self.checker.close()
        self.rows = rows
        self.checker = Checker(self.selector, rows, self.mapping)

    def next_deadline(self) -> float:
        return self.checker.next_deadline() if self.checker.enabled else math.inf

    def run_deadlines(self, now: float) -> None:
        self.checker.run_deadlines(now)

    def close_in_worker(self) -> None:
        """In a new worker: the checks' sockets and pipes are the master's."""
        self.checker.close()

    def close(self) -> None:
        self.checker.close()
        self.rows.close()
