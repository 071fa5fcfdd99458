"""Prometheus metric families read from the scoreboard, the admission count and the master.

`ScoreboardCollector` turns what the master can read (scoreboard slots and retired
totals, the admission count, its worker records, the target table: targets.py) into
metric families when a scrape asks, and answers /healthz. Never keeps metric state of
its own: every value is read at scrape time, so counters are as monotonic as the
scoreboard's retired totals make them.
"""

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from forkproxy import __version__
from forkproxy.relay.accept_proxy import METRIC_REASONS
from forkproxy.relay.engine import engine_name
from forkproxy.shared.admission import Admission
from forkproxy.shared.layout import (
    ACCESS_LOG_DROPPED,
    DG_BYTES_TO_CLIENT,
    DG_BYTES_TO_TARGET,
    DG_DROP_REASONS,
    DG_DROPPED,
    DG_SESSIONS,
    DG_SESSIONS_ACTIVE,
    DG_TO_CLIENT,
    DG_TO_TARGET,
    MAX_LISTENERS,
    PROXY_HEADER_ERRORS,
)
from forkproxy.shared.listener import Listener
from forkproxy.shared.scoreboard import (
    ACCEPTED,
    ACTIVE,
    BYTES_TO_CLIENT,
    BYTES_TO_TARGET,
    CONNECT_DURATION_BOUNDS,
    CONNECT_DURATION_BUCKETS,
    CONNECT_ERRORS,
    CONNECTION_DURATION_BOUNDS,
    CONNECTION_DURATION_BUCKETS,
    HEARTBEAT_NS,
    REFUSED,
    STATE,
    Scoreboard,
    SlotState,
)
from forkproxy.supervisor.metrics.reloads import ReloadView, reload_families
from forkproxy.supervisor.metrics.targets import (
    listener_families,
    no_target_reason,
    status_lines,
    target_families,
)
from forkproxy.supervisor.target_health import TargetsView
from forkproxy.supervisor.workers import STALE_HEARTBEATS

log = logging.getLogger("forkproxy")

# -- what the collector reads -------------------------------------------------------------


class WorkerView(Protocol):
    """The master's record of a live worker, as far as metrics read it."""

    @property
    def slot(self) -> int: ...

    @property
    def generation(self) -> int: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def killed(self) -> bool: ...


class MasterView(Protocol):
    """The supervision state metrics read (`master.Master` provides it)."""

    @property
    def workers(self) -> Mapping[int, WorkerView]: ...

    @property
    def generation(self) -> int: ...

    @property
    def target_workers(self) -> int: ...

    @property
    def restarts(self) -> int: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def heartbeat_interval(self) -> float: ...

    @property
    def listeners(self) -> Sequence[Listener]: ...  # the proxied ones: datagram metrics


class ScoreboardCollector(Collector):
    """Metric families read from the scoreboard, the admission count and the master."""

    def __init__(
        self,
        master: MasterView,
        scoreboard: Scoreboard,
        admission: Admission,
        reloads: ReloadView | None = None,
        targets: TargetsView | None = None,
    ) -> None:
        self.master = master
        self.scoreboard = scoreboard
        self.admission = admission
        self.reloads = reloads
        self.targets = targets  # the target table's rows of the settings, and the checks
        # (listener row, its `listener` label) of each datagram listener that has a row
        self.datagram_listeners = datagram_rows(master.listeners)

    def collect(self) -> Iterable[Metric]:
        board = self.scoreboard
        master = self.master
        live = {worker.slot for worker in master.workers.values()}

        yield GaugeMetricFamily(
            "forkproxy_connections_active",
            "Connections open now (admitted and not yet closed), across all workers.",
            value=self.admission.in_use(),
        )
        yield GaugeMetricFamily(
            "forkproxy_connections_max",
            "The cap on simultaneous connections (--connections-max).",
            value=self.admission.capacity,
        )
        yield CounterMetricFamily(
            "forkproxy_connections_accepted",
            "Connections accepted and admitted under the cap.",
            value=board.total(ACCEPTED),
        )
        yield CounterMetricFamily(
            "forkproxy_connections_refused",
            "Connections closed at once, unanswered, because a connection cap was reached.",
            value=board.total(REFUSED),
        )
        yield CounterMetricFamily(
            "forkproxy_backend_connect_errors",
            "Deprecated: use forkproxy_target_connect_errors_total (this is its sum over "
            "its labels).",
            value=board.total(CONNECT_ERRORS),
        )
        relayed = CounterMetricFamily(
            "forkproxy_relayed_bytes",
            "Bytes relayed: to_target from clients, to_client from targets.",
            labels=["direction"],
        )
        relayed.add_metric(["to_target"], board.total(BYTES_TO_TARGET))
        relayed.add_metric(["to_client"], board.total(BYTES_TO_CLIENT))
        yield relayed
        yield _histogram(
            "forkproxy_connect_duration_seconds",
            "Time to connect to a target, of connections that got one.",
            board,
            CONNECT_DURATION_BUCKETS,
            CONNECT_DURATION_BOUNDS,
        )
        yield _histogram(
            "forkproxy_connection_duration_seconds",
            "Lifetime of relayed connections, from accept to close.",
            board,
            CONNECTION_DURATION_BUCKETS,
            CONNECTION_DURATION_BOUNDS,
        )
        workers = GaugeMetricFamily(
            "forkproxy_workers",
            "Worker processes alive: of the current generation, and older ones still "
            "serving or draining after a reload.",
            labels=["generation"],
        )
        current = sum(1 for w in master.workers.values() if w.generation == master.generation)
        workers.add_metric(["current"], current)
        workers.add_metric(["draining"], len(master.workers) - current)
        yield workers
        yield GaugeMetricFamily(
            "forkproxy_workers_target",
            "Workers the master keeps running (--workers, changed by SIGTTIN and SIGTTOU).",
            value=master.target_workers,
        )
        yield CounterMetricFamily(
            "forkproxy_worker_restarts",
            "Workers started to replace workers that died unexpectedly.",
            value=master.restarts,
        )
        yield CounterMetricFamily(
            "forkproxy_access_log_dropped",
            "Access log lines not written: the file could not take them at once (a full "
            "disk, an I/O error, a full pipe or socket on standard error).",
            value=board.total(ACCESS_LOG_DROPPED),
        )
        header_errors = CounterMetricFamily(
            "forkproxy_proxy_header_errors",
            "Connections closed for their PROXY protocol header (--accept-proxy), by reason.",
            labels=["reason"],
        )
        for index, reason in enumerate(METRIC_REASONS):
            header_errors.add_metric([reason], board.total(PROXY_HEADER_ERRORS + index))
        yield header_errors
        yield from self._datagrams()
        if self.targets is not None:
            yield from target_families(self.targets.rows, self.targets.checker, board)
        yield from listener_families(master.listeners, board)
        yield from self._per_worker(live)
        yield from reload_families(self.reloads)
        yield InfoMetricFamily(
            "forkproxy_build",
            "The running forkproxy: its version and the workers' relay engine.",
            value={"version": __version__, "engine": engine_name()},
        )

    def _datagrams(self) -> Iterable[Metric]:
        """Datagram listeners' sessions, datagrams and drops, by listener (their rows)."""
        listeners = self.datagram_listeners
        if not listeners:
            return
        board = self.scoreboard
        active = GaugeMetricFamily(
            "forkproxy_datagram_sessions_active",
            "Datagram sessions open now (each holds a unit of the connection cap).",
            labels=["listener"],
        )
        opened = CounterMetricFamily(
            "forkproxy_datagram_sessions",
            "Datagram sessions opened: a new client address's first datagram admitted.",
            labels=["listener"],
        )
        datagrams = CounterMetricFamily(
            "forkproxy_datagrams",
            "Datagrams relayed: to_target from clients, to_client from targets.",
            labels=["listener", "direction"],
        )
        relayed = CounterMetricFamily(
            "forkproxy_datagram_bytes",
            "Bytes of the datagrams relayed, by direction.",
            labels=["listener", "direction"],
        )
        dropped = CounterMetricFamily(
            "forkproxy_datagrams_dropped",
            "Datagrams dropped, by reason: cap, per_source and busy (a new client at the "
            "connection cap, at its source's, or the admission lock taken), truncated "
            "(larger than the buffer), send_error (the kernel refused to send it), "
            "no_session (no socket to a target could be opened).",
            labels=["listener", "reason"],
        )
        for row, name in listeners:
            active.add_metric([name], board.row_live(row, DG_SESSIONS_ACTIVE))
            opened.add_metric([name], board.row_total(row, DG_SESSIONS))
            for direction, count, size in (
                ("to_target", DG_TO_TARGET, DG_BYTES_TO_TARGET),
                ("to_client", DG_TO_CLIENT, DG_BYTES_TO_CLIENT),
            ):
                datagrams.add_metric([name, direction], board.row_total(row, count))
                relayed.add_metric([name, direction], board.row_total(row, size))
            for index, reason in enumerate(DG_DROP_REASONS):
                dropped.add_metric([name, reason], board.row_total(row, DG_DROPPED + index))
        yield from (active, opened, datagrams, relayed, dropped)

    def _per_worker(self, live: set[int]) -> Iterable[Metric]:
        """By slot (a worker's identity): every live slot and every slot that ever accepted."""
        board = self.scoreboard
        accepted = CounterMetricFamily(
            "forkproxy_worker_connections_accepted",
            "Connections admitted, by worker slot (past workers in the slot included).",
            labels=["worker"],
        )
        active = GaugeMetricFamily(
            "forkproxy_worker_connections_active",
            "Connections open now, by live worker slot.",
            labels=["worker"],
        )
        relayed = CounterMetricFamily(
            "forkproxy_worker_relayed_bytes",
            "Bytes relayed, by worker slot and direction (past workers in the slot included).",
            labels=["worker", "direction"],
        )
        for slot in range(board.high_water()):
            count = board.counter(slot, ACCEPTED)
            if slot not in live and not count:
                continue
            worker = str(slot)
            accepted.add_metric([worker], count)
            relayed.add_metric([worker, "to_target"], board.counter(slot, BYTES_TO_TARGET))
            relayed.add_metric([worker, "to_client"], board.counter(slot, BYTES_TO_CLIENT))
            if slot in live:
                active.add_metric([worker], board.get(slot, ACTIVE))
        return (accepted, active, relayed)

    def health(self) -> tuple[bool, str]:
        """Healthy while every listener has a target up, and every current worker serves
        and there are as many as asked for.

        Current: of the newest generation, neither asked to stop nor killed. During a
        rotation that is the new generation, so health dips until it serves. Serving: in
        state SERVING with a heartbeat at most STALE_HEARTBEATS intervals old, so frozen
        workers (SIGSTOP, a loop stuck) make it fail long before --worker-timeout.
        """
        master = self.master
        if master.stopping:
            return False, "stopping"
        no_target = None if self.targets is None else no_target_reason(self.targets.rows)
        if no_target is not None:
            return False, no_target
        board = self.scoreboard
        current = [
            worker
            for worker in master.workers.values()
            if worker.generation == master.generation and not worker.stopping and not worker.killed
        ]
        started = [w for w in current if board.get(w.slot, STATE) == SlotState.SERVING]
        fresh_after = time.monotonic_ns() - STALE_HEARTBEATS * master.heartbeat_interval * 1e9
        serving = sum(1 for w in started if board.get(w.slot, HEARTBEAT_NS) >= fresh_after)
        healthy = serving == len(current) == master.target_workers
        reason = f"{serving} of {master.target_workers} workers serving"
        if serving < len(started):
            reason += f", {len(started) - serving} not responding"
        return healthy, reason

    def status(self) -> tuple[bool, str]:
        """/healthz?verbose: the health line, then each listener's targets."""
        healthy, reason = self.health()
        lines = [reason]
        if self.targets is not None:
            lines += status_lines(self.targets.rows, self.scoreboard)
        return healthy, "\n".join(lines)


def _histogram(
    name: str, documentation: str, board: Scoreboard, first_bucket: int, bounds: Sequence[float]
) -> HistogramMetricFamily:
    cumulative, sum_ns = board.histogram(first_bucket, bounds)
    upper = [floatToGoString(bound) for bound in bounds] + ["+Inf"]
    buckets = list(zip(upper, cumulative, strict=True))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=sum_ns / 1e9)


def datagram_rows(listeners: Sequence[Listener]) -> list[tuple[int, str]]:
    """(row, metrics label) of each datagram listener, by its index among the listeners;
    past MAX_LISTENERS there are no rows (said in the log)."""
    rows = []
    for index, listener in enumerate(listeners):
        if not listener.is_datagram:
            continue
        if index >= MAX_LISTENERS:
            log.warning(
                "datagram listener %s is listener %d: metrics are kept for the first %d only",
                listener.label,
                index + 1,
                MAX_LISTENERS,
            )
            continue
        rows.append((index, listener.name or listener.label))
    return rows


def make_registry(collector: Collector) -> CollectorRegistry:
    """A private registry: `collector` plus the process_* metrics of this process."""
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry
