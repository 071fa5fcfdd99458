"""Per-target and per-listener metric families, and the targets' part of /healthz.

Read at scrape time from the target table (UP, cool-downs), the workers' target and
listener rows (summed over live slots for gauges, with the retired totals for counters)
and the checker's duration histogram in the mapping. Labels are the configuration's:
the listener's metrics name and the target as written. Keeps no state.
"""

import time
from collections.abc import Iterable, Sequence

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from forkproxy.settings.timespan import format_timespan
from forkproxy.shared.layout import (
    CHECK_DURATION_BOUNDS,
    CONNECT_ERROR_REASONS,
    L_CONNECTIONS,
    L_REFUSED,
    LISTENER_REFUSALS,
    MAX_LISTENERS,
    T_ACTIVE,
    T_BYTES_TO_CLIENT,
    T_BYTES_TO_TARGET,
    T_CONNECT_ERRORS,
    T_CONNECTIONS,
)
from forkproxy.shared.listener import Listener
from forkproxy.shared.scoreboard import Scoreboard
from forkproxy.shared.targets_table import CheckReason
from forkproxy.supervisor.health import Checker, describe
from forkproxy.supervisor.target_rows import TargetEntry, TargetRows, listener_text


def target_families(rows: TargetRows, checker: Checker, board: Scoreboard) -> Iterable[Metric]:
    """forkproxy_target_*: one series per (listener, target) of the configuration."""
    now_ns = time.monotonic_ns()
    labels = ["listener", "target"]
    up = GaugeMetricFamily(
        "forkproxy_target_up",
        "1 if workers may send clients to the target: up as far as active checks tell "
        "(or not checked), and not cooling down after a failed connect; else 0.",
        labels=labels,
    )
    active = GaugeMetricFamily(
        "forkproxy_target_connections_active",
        "Connections to the target open now, across all workers.",
        labels=labels,
    )
    total = CounterMetricFamily(
        "forkproxy_target_connections",
        "Connections made to the target (the connect succeeded).",
        labels=labels,
    )
    errors = CounterMetricFamily(
        "forkproxy_target_connect_errors",
        "Connect attempts to the target that failed, by reason: refused (also a unix "
        "socket that does not exist), timeout, unreachable, other.",
        labels=[*labels, "reason"],
    )
    relayed = CounterMetricFamily(
        "forkproxy_target_relayed_bytes",
        "Bytes relayed: to_target from clients, to_client from the target.",
        labels=[*labels, "direction"],
    )
    table = rows.table
    for entry in rows.entries:
        names = [entry.listener, entry.target.text]
        row = entry.row
        up.add_metric(names, 1 if table.usable(row, now_ns) else 0)
        active.add_metric(names, board.target_live(row, T_ACTIVE))
        total.add_metric(names, board.target_total(row, T_CONNECTIONS))
        for index, reason in enumerate(CONNECT_ERROR_REASONS):
            errors.add_metric([*names, reason], board.target_total(row, T_CONNECT_ERRORS + index))
        relayed.add_metric([*names, "to_target"], board.target_total(row, T_BYTES_TO_TARGET))
        relayed.add_metric([*names, "to_client"], board.target_total(row, T_BYTES_TO_CLIENT))
    yield from (up, active, total, errors, relayed)
    if checker.enabled:
        cumulative, sum_ns = checker.histogram()
        upper = [floatToGoString(bound) for bound in CHECK_DURATION_BOUNDS] + ["+Inf"]
        yield HistogramMetricFamily(
            "forkproxy_target_check_duration_seconds",
            "Time active health checks took, passed or failed (a timeout's is its timeout).",
            buckets=list(zip(upper, cumulative, strict=True)),
            sum_value=sum_ns / 1e9,
        )


def listener_families(listeners: Sequence[Listener], board: Scoreboard) -> Iterable[Metric]:
    """forkproxy_listener_*: by stream and sequential-packet listener (datagram listeners
    have forkproxy_datagram_*); listeners of one name add up in one series."""
    rows: dict[str, list[int]] = {}
    for index, listener in enumerate(listeners[:MAX_LISTENERS]):
        if not listener.is_datagram:
            rows.setdefault(listener.metrics_name, []).append(index)
    if not rows:
        return
    connections = CounterMetricFamily(
        "forkproxy_listener_connections",
        "Clients accepted on the listener and admitted under the caps.",
        labels=["listener"],
    )
    refused = CounterMetricFamily(
        "forkproxy_listener_connections_refused",
        "Clients accepted and closed unserved, by reason: cap, per_source, busy (a cap "
        "reached, or the admission lock stayed taken), no_target (no target could be "
        "connected to), proxy_header (a bad PROXY header).",
        labels=["listener", "reason"],
    )
    for name, indexes in rows.items():
        connections.add_metric([name], sum(board.row_total(i, L_CONNECTIONS) for i in indexes))
        for offset, reason in enumerate(LISTENER_REFUSALS):
            count = sum(board.row_total(i, L_REFUSED + offset) for i in indexes)
            refused.add_metric([name, reason], count)
    yield from (connections, refused)


def no_target_reason(rows: TargetRows) -> str | None:
    """Why /healthz fails for the targets: a listener none of whose targets is up."""
    down = [
        (name, total) for name, (up, total) in rows.usable_counts().items() if up == 0 and total
    ]
    if not down:
        return None
    name, total = down[0]
    entry = rows.listeners[name][0]
    reason = f"listener {listener_text(entry)} has no target up ({total} down)"
    if len(down) > 1:
        more = len(down) - 1
        reason += f", and {more} more listener{'s' if more > 1 else ''}"
    return reason


def status_lines(rows: TargetRows, board: Scoreboard) -> list[str]:
    """/healthz?verbose: each listener and its targets, for a human."""
    now_ns = time.monotonic_ns()
    table = rows.table
    lines = []
    counts = rows.usable_counts(now_ns)
    for name, entries in rows.listeners.items():
        up, total = counts[name]
        lines.append(f"listener {listener_text(entries[0])}: {up} of {total} targets up")
        for entry in entries:
            state = _target_state(rows, entry, now_ns)
            active = board.target_live(entry.row, T_ACTIVE)
            usable = "up" if table.usable(entry.row, now_ns) else "DOWN"
            lines.append(f"  {entry.target.text} {usable}{state}, {active} active")
    return lines


def _target_state(rows: TargetRows, entry: TargetEntry, now_ns: int) -> str:
    table = rows.table
    parts = []
    _, reason, detail, checked_ns, changed_ns = table.check_state(entry.row)
    if entry.settings.checks and checked_ns:
        since = format_timespan(round(max(0, now_ns - changed_ns) / 1e9)) if changed_ns else ""
        if not table.is_up(entry.row):
            text = describe(reason, detail, entry.settings.effective_check_timeout)
            parts.append(f"checks fail: {text}" + (f", for {since}" if since else ""))
        elif reason != CheckReason.PASSED:
            parts.append(f"last check failed: {describe(reason, detail)}")
    cooldown = table.cooldown_until(entry.row) - now_ns
    if cooldown > 0:
        parts.append(f"cooling down for {cooldown / 1e9:.1f}s after a failed connect")
    return f" ({'; '.join(parts)})" if parts else ""
