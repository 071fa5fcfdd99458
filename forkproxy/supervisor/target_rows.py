"""The configuration's (listener, target) pairs and their rows of the target table.

`TargetRows.set_up` hands the pairs their rows (shared/targets_table.py: stable by the
listener's metrics name and the target as written, so a reload keeps each pair's row
and health), forgets what a reused row counted for its former pair, marks unchecked
targets up, and tells the scoreboard which rows to fold when a worker is reaped. What it
holds is what workers get (`by_listener`, in the WorkerSpec) and what the checker,
metrics, /healthz and STATUS= read (`entries`, `usable_counts`). `pair_problems` is the
startup check that the pairs fit the table (`--check` runs it too). Never forks, never
logs.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass

from forkproxy.settings.address import TargetAddress
from forkproxy.settings.config import Config, ListenerSettings
from forkproxy.shared.layout import MAX_TARGETS
from forkproxy.shared.listener import Listener
from forkproxy.shared.mapping import SharedMapping
from forkproxy.shared.scoreboard import Scoreboard
from forkproxy.shared.targets_table import (
    ListenerTargets,
    RowKey,
    TargetTable,
    listener_targets,
    route_targets,
)


@dataclass(frozen=True, slots=True)
class TargetEntry:
    """One (listener, target) pair and its row."""

    listener: str  # the listener's metrics name (its name, else its label)
    named: bool  # whether that is a name (FileDescriptorName=, --listen NAME=)
    kind: int  # the listener's socket type: what its targets take
    target: TargetAddress
    settings: ListenerSettings  # the listener's: its checks, its PROXY header
    row: int


def pair_keys(names: Sequence[str], settings: Sequence[ListenerSettings]) -> list[RowKey]:
    """The distinct (listener, target) pairs of listeners so named with these settings."""
    keys = [
        (name, target.text)
        for name, one in zip(names, settings, strict=True)
        for target in route_targets(one)
    ]
    return list(dict.fromkeys(keys))


def pair_problems(config: Config, names: Sequence[str]) -> list[str]:
    """The error if the listeners' (listener, target) pairs outnumber the table's rows.

    `names`: each listener's metrics name (in --check, any name unique per unnamed
    listener does: only how many pairs there are matters)."""
    keys = pair_keys(names, [config.settings_for(name) for name in names])
    if len(keys) <= MAX_TARGETS:
        return []
    return [
        f"too many targets: the listeners have {len(keys)} (listener, target) pairs, and "
        f"forkproxy keeps health and metrics for at most {MAX_TARGETS}"
    ]


class TargetRows:
    """The pairs of the running configuration and their rows; owns the table's view."""

    def __init__(self, table: TargetTable, entries: Sequence[TargetEntry]) -> None:
        self.table = table
        self.entries = tuple(entries)
        self.by_listener: tuple[ListenerTargets, ...] = ()  # parallel to the listeners
        # By the listener's metrics name: its entries (one listener's, if several share it).
        self.listeners: dict[str, tuple[TargetEntry, ...]] = {}
        for entry in self.entries:
            self.listeners[entry.listener] = (*self.listeners.get(entry.listener, ()), entry)

    @classmethod
    def set_up(
        cls,
        config: Config,
        listeners: Sequence[Listener],
        mapping: SharedMapping,
        scoreboard: Scoreboard,
    ) -> "TargetRows":
        """Rows for the pairs of `listeners` under `config` (TargetTableFull if they do
        not fit: the startup check, `pair_problems`, says so first)."""
        table = TargetTable(mapping)
        names = [listener.metrics_name for listener in listeners]
        settings = [config.settings_for(listener.name) for listener in listeners]
        assignment = table.assign(pair_keys(names, settings))
        for row in assignment.reused:
            scoreboard.forget_target_totals(row)
        scoreboard.target_rows = table.high_water()
        entries: dict[RowKey, TargetEntry] = {}
        for listener, name, one in zip(listeners, names, settings, strict=True):
            for target in route_targets(one):
                key = (name, target.text)
                row = assignment.rows[key]
                if key not in entries:
                    entries[key] = TargetEntry(
                        name, bool(listener.name), listener.kind, target, one, row
                    )
                if not one.checks:
                    table.forget_checks(row)
        rows = cls(table, list(entries.values()))
        rows.by_listener = listener_targets(
            names, [route_targets(one) for one in settings], assignment.rows
        )
        return rows

    def usable_counts(self, now_ns: int | None = None) -> dict[str, tuple[int, int]]:
        """By listener metrics name: (targets usable, targets)."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        table = self.table
        return {
            name: (sum(1 for entry in entries if table.usable(entry.row, now_ns)), len(entries))
            for name, entries in self.listeners.items()
        }

    def close(self) -> None:
        self.table.close()


def listener_text(entry: TargetEntry) -> str:
    """How a log line names the entry's listener: 'web', or fd 3 (127.0.0.1:80)."""
    return f"'{entry.listener}'" if entry.named else entry.listener
