"""The master's HTTP responder for /metrics and /healthz, run from its selector loop.

`MetricsEndpoint` answers HTTP on the metrics sockets from the master's `selectors`
loop: non-blocking accept, a bounded request, partial writes, and one deadline per client
that the master waits on with its others. Exposition is prometheus_client's (text
format 0.0.4) of what `collector.ScoreboardCollector` reads. Never starts a thread,
never blocks, and never runs in a worker: a new worker closes the endpoint's sockets.

Idle clients cannot starve a health probe: the endpoint never stops accepting because
it has MAX_CLIENTS clients; a new client takes the place of the oldest one still waiting
for its request (then of the oldest done), so holding sockets open only cuts the holders'
own earlier connections. A probe sends its request as it connects and is read at once,
in the same pass as its accept, so it is answered before anyone can push it out. (Serving
/healthz first would not help: a starved probe waits in the listen backlog, unread.)

At start-up a /healthz (or /status) request is held until forkproxy is healthy, or its
start-up time is up: under socket activation the request that started forkproxy is
the first one read, long before a worker serves, and it asks whether forkproxy is up,
not whether it has finished starting. Once healthy, or past that time, requests are
answered at once.
"""

import errno
import logging
import math
import re
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from forkproxy import logs
from forkproxy.shared.admission import Admission
from forkproxy.shared.listener import Listener
from forkproxy.shared.scoreboard import Scoreboard
from forkproxy.supervisor.metrics.collector import MasterView, ScoreboardCollector, make_registry
from forkproxy.supervisor.metrics.reloads import ReloadView
from forkproxy.supervisor.target_health import TargetsView

log = logging.getLogger("forkproxy")


CLIENT_TIMEOUT = 10.0  # one client's whole exchange: request, response, close
MAX_REQUEST_SIZE = 8192  # request line and headers; more gets 431
MAX_CLIENTS = 64  # at once; a new one then takes the place of an old one
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


def open_metrics(
    listeners: Sequence[Listener],
    selector: selectors.BaseSelector,
    master: MasterView,
    scoreboard: Scoreboard,
    admission: Admission,
    reloads: ReloadView | None = None,
    targets: TargetsView | None = None,
    start_timeout: float = 0.0,
) -> "MetricsEndpoint | None":
    """The master's metrics endpoint on `listeners` (None if there are none), holding
    health requests for up to `start_timeout` until healthy."""
    if not listeners:
        return None
    collector = ScoreboardCollector(master, scoreboard, admission, reloads, targets)
    registry = make_registry(collector)
    endpoint = MetricsEndpoint(
        listeners,
        selector,
        partial(generate_latest, registry),
        collector.health,
        start_deadline=time.monotonic() + start_timeout,
    )
    endpoint.status = collector.status
    for listener in listeners:
        log.info("serving metrics on %s (/metrics, /healthz, /status)", listener.label)
    return endpoint


# -- the HTTP responder -------------------------------------------------------------------


class _Client:
    """One metrics client: read the request head, write the response, wait for its close."""

    __slots__ = ("endpoint", "sock", "deadline", "head", "response", "lingering", "held", "events")

    def __init__(self, endpoint: "MetricsEndpoint", sock: socket.socket, deadline: float) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.deadline = deadline
        self.head = bytearray()
        self.response: memoryview | None = None
        self.lingering = False  # response sent and write side shut: reading to EOF
        self.held: bytes | None = None  # a health request's head, held during start-up
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
        ignoring = self.lingering or self.held is not None
        want = 4096 if ignoring else MAX_REQUEST_SIZE - len(self.head)
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
        if ignoring:
            return  # input after the request is ignored
        self.head += data
        end = _END_OF_HEAD.search(self.head)
        if end is not None:
            head = bytes(self.head[: end.start()])
            if self.endpoint.holds(head):
                self.endpoint.hold(self, head)
            else:
                self.respond(self.endpoint.response_for(head))
        elif len(self.head) >= MAX_REQUEST_SIZE:
            self.respond(_response(431, b"request head too large\n"))

    def respond(self, response: bytes) -> None:
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
        start_deadline: float = -math.inf,
    ) -> None:
        self.listeners = tuple(listeners)
        self.selector = selector
        self.render = render
        self.health = health
        self.status = health  # /healthz?verbose and /status: more lines, if it has them
        self.client_timeout = client_timeout
        self.max_clients = max_clients
        self.clients: dict[_Client, None] = {}  # in the order they came
        # Until then, while not healthy, health requests wait (`held`) instead of a 503.
        self.start_deadline = start_deadline
        self.held: dict[_Client, None] = {}
        self.accepting = False
        self.resume_deadline = math.inf  # when to accept again after running out of fds
        self.accept_failures = logs.RateLimitedLog(log, logging.WARNING)
        self._on_readable = [partial(self._accept, listener) for listener in self.listeners]
        self._start_accepting()

    # -- the caller's loop ----------------------------------------------------------------

    def next_deadline(self) -> float:
        deadline = self.resume_deadline
        if self.held:
            deadline = min(deadline, self.start_deadline)
        for client in self.clients:
            deadline = min(deadline, client.deadline)
        return deadline

    def run_deadlines(self, now: float) -> None:
        """Called after every wakeup of the loop, not only at a deadline: a worker that
        starts to serve may be what makes held requests answerable."""
        if self.held and (now >= self.start_deadline or self.health()[0]):
            self.start_deadline = -math.inf  # started, or given up on: answer from now on
            for client in list(self.held):
                self._release(client)
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
        if not self.accepting and math.isinf(self.resume_deadline):
            self._start_accepting()

    def _accept(self, listener: Listener) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self.accepting:
                return  # paused earlier in this round of events
            try:
                sock, _ = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self._on_accept_error(error, listener)
                return
            if len(self.clients) >= self.max_clients:
                self._make_room()
            sock.setblocking(False)
            client = _Client(self, sock, time.monotonic() + self.client_timeout)
            self.clients[client] = None
            self.selector.register(sock, selectors.EVENT_READ, client.on_ready)
            client.on_ready()  # the request usually came with the connection

    def _make_room(self) -> None:
        """Close the oldest client still waiting for its request, else the oldest."""
        waiting = (c for c in self.clients if c.response is None and not c.lingering)
        oldest = next(waiting, None) or next(iter(self.clients))
        log.debug("%d metrics clients, closing the oldest to make room", len(self.clients))
        self.close_client(oldest)

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
        self.clients.pop(client, None)
        self.held.pop(client, None)
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        self._maybe_resume()

    # -- answering ------------------------------------------------------------------------

    def holds(self, head: bytes) -> bool:
        """Whether to hold this request: a health request during start-up, unhealthy."""
        if time.monotonic() >= self.start_deadline:
            return False
        path = head.split(b" ", 2)[1:2]
        if path and path[0].partition(b"?")[0] in (b"/healthz", b"/status"):
            if self.health()[0]:
                self.start_deadline = -math.inf  # healthy once: start-up is over
                return False
            return True
        return False

    def hold(self, client: _Client, head: bytes) -> None:
        """Answer `client` when healthy or at the start deadline (`run_deadlines`)."""
        client.held = head
        client.deadline = max(client.deadline, self.start_deadline + self.client_timeout)
        self.held[client] = None

    def _release(self, client: _Client) -> None:
        self.held.pop(client, None)
        head, client.held = client.held, None
        if head is not None and client.sock.fileno() >= 0:
            client.respond(self.response_for(head))

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
        path, _, query = target.partition(b"?")
        if path == b"/metrics":
            try:
                body = self.render()
            except Exception:  # a bug in collecting must not stop the master supervising
                log.exception("cannot collect metrics")
                return _response(500, b"cannot collect metrics, see the log\n", with_body)
            return _response(200, body, with_body, CONTENT_TYPE_PLAIN_0_0_4)
        if path == b"/healthz" or path == b"/status":
            verbose = path == b"/status" or b"verbose" in query.split(b"&")
            healthy, reason = self.status() if verbose else self.health()
            return _response(200 if healthy else 503, reason.encode() + b"\n", with_body)
        return _response(404, b"not found: try /metrics, /healthz or /status\n", with_body)


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
