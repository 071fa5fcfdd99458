"""The reload families: how many reloads (SIGHUP, SIGUSR2) ended how, and when the last
one succeeded. Read from the master's `reload.Reloader` at scrape time; never keeps
state of its own (a re-executed master keeps the counters: takeover.py).
"""

from collections.abc import Iterable
from typing import Protocol

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric


class ReloadView(Protocol):
    """The reload counters (`reload.Reloader`); a re-executed master keeps them."""

    @property
    def ok(self) -> int: ...

    @property
    def failed(self) -> int: ...

    @property
    def last_success(self) -> float | None: ...


def reload_families(reloads: ReloadView | None) -> Iterable[Metric]:
    """forkproxy_reloads{result} and the last success's time; none without a reloader."""
    if reloads is None:
        return
    counts = CounterMetricFamily(
        "forkproxy_reloads",
        "Reloads (SIGHUP, SIGUSR2) by result: ok once the new workers serve, failed "
        "when the old settings and workers stayed.",
        labels=["result"],
    )
    counts.add_metric(["ok"], reloads.ok)
    counts.add_metric(["failed"], reloads.failed)
    yield counts
    last = reloads.last_success
    yield GaugeMetricFamily(
        "forkproxy_last_reload_success_timestamp_seconds",
        "When the last successful reload's new workers served (Unix time; 0: never).",
        value=0.0 if last is None else last,
    )
