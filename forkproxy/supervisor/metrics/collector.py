"""Prometheus metrics for the master: scoreboard totals, served from the master's own loop.

`ScoreboardCollector` turns what the master can read (scoreboard slots and retired
totals, the admission semaphore, its own worker records) into metric families when a
scrape asks; `MetricsEndpoint` answers HTTP on the metrics sockets from the master's
`selectors` loop: non-blocking accept, a bounded request, partial writes, and one
deadline per client that the master waits on with its others. Exposition is
prometheus_client's (text format 0.0.4).

Never keeps metric state of its own (every value is read at scrape time, so counters are
as monotonic as the scoreboard's retired totals make them), never starts a thread, never
blocks, and never runs in a worker: a new worker closes the endpoint's sockets.
"""

import errno
import logging
import math
import re
import selectors
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from forkproxy import __version__, logs
from forkproxy.shared.admission import Admission
from forkproxy.shared.scoreboard import (
    ACCEPTED,
    ACTIVE,
    BYTES_TO_CLIENT,
    BYTES_TO_UPSTREAM,
    CONNECT_DURATION_BOUNDS,
    CONNECT_DURATION_BUCKETS,
    CONNECT_ERRORS,
    CONNECTION_DURATION_BOUNDS,
    CONNECTION_DURATION_BUCKETS,
    REFUSED,
    STATE,
    Scoreboard,
    SlotState,
)
from forkproxy.supervisor.activation import Listener

log = logging.getLogger("forkproxy")


CLIENT_TIMEOUT = 10.0  # one client's whole exchange: request, response, close
MAX_REQUEST_SIZE = 8192  # request line and headers; more gets 431
MAX_CLIENTS = 16  # at once; further clients wait in the listen backlog
ACCEPT_BATCH = 16  # accepts per wakeup
ACCEPT_PAUSE = 0.5  # seconds to stop accepting after running out of descriptors

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_TEXT = "text/plain; charset=utf-8"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


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


class ScoreboardCollector(Collector):
    """Metric families read from the scoreboard, the admission set and the master."""

    def __init__(self, master: MasterView, scoreboard: Scoreboard, admission: Admission) -> None:
        self.master = master
        self.scoreboard = scoreboard
        self.admission = admission

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
            "Admitted connections closed because the backend could not be connected to.",
            value=board.total(CONNECT_ERRORS),
        )
        relayed = CounterMetricFamily(
            "forkproxy_relayed_bytes",
            "Bytes relayed: to_backend from clients, to_client from the backend.",
            labels=["direction"],
        )
        relayed.add_metric(["to_backend"], board.total(BYTES_TO_UPSTREAM))
        relayed.add_metric(["to_client"], board.total(BYTES_TO_CLIENT))
        yield relayed
        yield _histogram(
            "forkproxy_connect_duration_seconds",
            "Time to connect to the backend, of connections that got one.",
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
        yield GaugeMetricFamily(
            "forkproxy_workers", "Worker processes alive.", value=len(master.workers)
        )
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
        yield from self._per_worker(live)
        yield InfoMetricFamily(
            "forkproxy_build", "The running forkproxy version.", value={"version": __version__}
        )

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
        for slot in range(board.slot_count):
            count = board.counter(slot, ACCEPTED)
            if slot not in live and not count:
                continue
            worker = str(slot)
            accepted.add_metric([worker], count)
            relayed.add_metric([worker, "to_backend"], board.counter(slot, BYTES_TO_UPSTREAM))
            relayed.add_metric([worker, "to_client"], board.counter(slot, BYTES_TO_CLIENT))
            if slot in live:
                active.add_metric([worker], board.get(slot, ACTIVE))
        return (accepted, active, relayed)

    def health(self) -> tuple[bool, str]:
        """Healthy while every current worker serves and there are as many as asked for.

        Current: of the newest generation, neither asked to stop nor killed. During a
        rotation that is the new generation, so health dips until it serves.
        """
        master = self.master
        if master.stopping:
            return False, "stopping"
        current = [
            worker
            for worker in master.workers.values()
            if worker.generation == master.generation and not worker.stopping and not worker.killed
        ]
        serving = sum(
            1 for worker in current if self.scoreboard.get(worker.slot, STATE) == SlotState.SERVING
        )
        healthy = serving == len(current) == master.target_workers
        return healthy, f"{serving} of {master.target_workers} workers serving"


def _histogram(
    name: str, documentation: str, board: Scoreboard, first_bucket: int, bounds: Sequence[float]
) -> HistogramMetricFamily:
    cumulative, sum_ns = board.histogram(first_bucket, bounds)
    upper = [floatToGoString(bound) for bound in bounds] + ["+Inf"]
    buckets = list(zip(upper, cumulative, strict=True))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=sum_ns / 1e9)


def make_registry(collector: Collector) -> CollectorRegistry:
    """A private registry: `collector` plus the process_* metrics of this process."""
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def open_metrics(
    listeners: Sequence[Listener],
    selector: selectors.BaseSelector,
    master: MasterView,
    scoreboard: Scoreboard,
    admission: Admission,
) -> "MetricsEndpoint | None":
    """The master's metrics endpoint on `listeners` (None if there are none)."""
    if not listeners:
        return None
    collector = ScoreboardCollector(master, scoreboard, admission)
    registry = make_registry(collector)
    endpoint = MetricsEndpoint(
        listeners, selector, partial(generate_latest, registry), collector.health
    )
    for listener in listeners:
        log.info("serving metrics on %s (/metrics, /healthz)", listener.label)
    return endpoint


# -- the HTTP responder -------------------------------------------------------------------


class _Client:
    """One metrics client: read the request head, write the response, wait for its close."""

    __slots__ = ("endpoint", "sock", "deadline", "head", "response", "lingering", "events")

    def __init__(self, endpoint: "MetricsEndpoint", sock: socket.socket, deadline: float) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.deadline = deadline
        self.head = bytearray()
        self.response: memoryview | None = None
        self.lingering = False  # response sent and write side shut: reading to EOF
        self.events = selectors.EVENT_READ

    def on_ready(self) -> None:
        """Called by the master loop when the socket is ready for what we wait on."""
        if self.sock.fileno() < 0:
            return  # closed earlier in the same round of events
        if self.response is not None:
            self._write()
        else:
            self._read()

    def _read(self) -> None:
        want = 4096 if self.lingering else MAX_REQUEST_SIZE - len(self.head)
        try:
            data = self.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.endpoint.close_client(self)
            return
        if not data:  # the client is done (or gave up before a whole request)
            self.endpoint.close_client(self)
            return
        if self.lingering:
            return  # input after the request is ignored
        self.head += data
        end = _END_OF_HEAD.search(self.head)
        if end is not None:
            self._respond(self.endpoint.response_for(bytes(self.head[: end.start()])))
        elif len(self.head) >= MAX_REQUEST_SIZE:
            self._respond(_response(431, b"request head too large\n"))

    def _respond(self, response: bytes) -> None:
        self.head = bytearray()
        self.response = memoryview(response)
        self._write()

    def _write(self) -> None:
        assert self.response is not None
        try:
            sent = self.sock.send(self.response)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.endpoint.close_client(self)
            return
        self.response = self.response[sent:]
        if self.response:
            self._wait_for(selectors.EVENT_WRITE)
            return
        # All sent. Closing now with unread input would reset the connection and could
        # destroy the response in flight; shut our side and read until the client closes.
        self.response = None
        self.lingering = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.endpoint.close_client(self)
            return
        self._wait_for(selectors.EVENT_READ)

    def _wait_for(self, events: int) -> None:
        if events != self.events:
            self.events = events
            self.endpoint.selector.modify(self.sock, events, self.on_ready)


class MetricsEndpoint:
    """Serves /metrics and /healthz on `listeners` from the caller's selector.

    Registers its listeners and clients with `selector`, whose loop calls each key's
    data with no arguments. The caller waits until `next_deadline()` at the latest and
    then calls `run_deadlines()`. Owns its client sockets (`close()`); the listeners
    stay the caller's to close.
    """

    def __init__(
        self,
        listeners: Sequence[Listener],
        selector: selectors.BaseSelector,
        render: Callable[[], bytes],
        health: Callable[[], tuple[bool, str]],
        client_timeout: float = CLIENT_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.listeners = tuple(listeners)
        self.selector = selector
        self.render = render
        self.health = health
        self.client_timeout = client_timeout
        self.max_clients = max_clients
        self.clients: set[_Client] = set()
        self.accepting = False
        self.resume_deadline = math.inf  # when to accept again after running out of fds
        self.accept_failures = logs.RateLimitedLog(log, logging.WARNING)
        self._on_readable = [partial(self._accept, listener) for listener in self.listeners]
        self._start_accepting()

    # -- the caller's loop ----------------------------------------------------------------

    def next_deadline(self) -> float:
        deadline = self.resume_deadline
        for client in self.clients:
            deadline = min(deadline, client.deadline)
        return deadline

    def run_deadlines(self, now: float) -> None:
        if now >= self.resume_deadline:
            self.resume_deadline = math.inf
            self._maybe_resume()
        for client in [client for client in self.clients if now >= client.deadline]:
            log.debug("metrics client did not finish within %gs, closing it", self.client_timeout)
            self.close_client(client)

    def close(self) -> None:
        """Close every client socket: at exit, and in a new worker (its copies only).

        Leaves the selector alone; call it only when the selector is closed or about to be.
        """
        for client in self.clients:
            client.sock.close()
        self.clients.clear()

    # -- accepting ------------------------------------------------------------------------

    def _start_accepting(self) -> None:
        self.accepting = True
        for listener, callback in zip(self.listeners, self._on_readable, strict=True):
            self.selector.register(listener.sock, selectors.EVENT_READ, callback)

    def _stop_accepting(self) -> None:
        if self.accepting:
            self.accepting = False
            for listener in self.listeners:
                self.selector.unregister(listener.sock)

    def _maybe_resume(self) -> None:
        if (
            not self.accepting
            and math.isinf(self.resume_deadline)
            and len(self.clients) < self.max_clients
        ):
            self._start_accepting()

    def _accept(self, listener: Listener) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self.accepting:
                return  # paused earlier in this round of events
            if len(self.clients) >= self.max_clients:
                self._stop_accepting()  # the rest wait in the backlog
                return
            try:
                sock, _ = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self._on_accept_error(error, listener)
                return
            sock.setblocking(False)
            client = _Client(self, sock, time.monotonic() + self.client_timeout)
            self.clients.add(client)
            self.selector.register(sock, selectors.EVENT_READ, client.on_ready)

    def _on_accept_error(self, error: OSError, listener: Listener) -> None:
        if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # The listener stays readable: stop looking until descriptors may be free.
            self.accept_failures.log(
                "cannot accept on metrics socket %s: %s; pausing for %gs",
                listener.label,
                error.strerror,
                ACCEPT_PAUSE,
            )
            self._stop_accepting()
            self.resume_deadline = time.monotonic() + ACCEPT_PAUSE
        elif error.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
            self.accept_failures.log(
                "cannot accept on metrics socket %s: %s, ignoring", listener.label, error
            )

    def close_client(self, client: _Client) -> None:
        self.clients.discard(client)
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        self._maybe_resume()

    # -- answering ------------------------------------------------------------------------

    def response_for(self, head: bytes) -> bytes:
        """The whole response to a request head (request line and headers, no blank line)."""
        request_line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(400, b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET and HEAD\n", allow=True)
        with_body = method == b"GET"
        path = target.split(b"?", 1)[0]
        if path == b"/metrics":
            try:
                body = self.render()
            except Exception:  # a bug in collecting must not stop the master supervising
                log.exception("cannot collect metrics")
                return _response(500, b"cannot collect metrics, see the log\n", with_body)
            return _response(200, body, with_body, CONTENT_TYPE_PLAIN_0_0_4)
        if path == b"/healthz":
            healthy, reason = self.health()
            return _response(200 if healthy else 503, reason.encode() + b"\n", with_body)
        return _response(404, b"not found: try /metrics or /healthz\n", with_body)


def _response(
    status: int,
    body: bytes,
    with_body: bool = True,
    content_type: str = _TEXT,
    allow: bool = False,
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        + ("Allow: GET, HEAD\r\n" if allow else "")
        + "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head + body if with_body else head
