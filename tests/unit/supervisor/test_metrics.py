"""Metrics: the collector over a real scoreboard, the health rule, the HTTP responder on real
sockets driven by a real selector, and the --metrics option."""

import math
import os
import selectors
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from forkproxy import __version__
from forkproxy.errors import UsageError
from forkproxy.relay.engine import engine_name
from forkproxy.settings.address import parse_metrics
from forkproxy.settings.arguments import parse_args
from forkproxy.shared.admission import ADMITTED, Admission
from forkproxy.shared.listener import Listener
from forkproxy.shared.scoreboard import (
    ACCEPTED,
    ACTIVE,
    BYTES_TO_CLIENT,
    BYTES_TO_TARGET,
    CONNECT_DURATION_BOUNDS,
    CONNECT_DURATION_BUCKETS,
    CONNECT_DURATION_SUM_NS,
    CONNECT_ERRORS,
    CONNECTION_DURATION_BOUNDS,
    CONNECTION_DURATION_BUCKETS,
    CONNECTION_DURATION_SUM_NS,
    HEARTBEAT_NS,
    REFUSED,
    STATE,
    Scoreboard,
    SlotState,
)
from forkproxy.supervisor.listeners import bind_listener, close_listeners
from forkproxy.supervisor.metrics.collector import ScoreboardCollector, make_registry
from forkproxy.supervisor.metrics.endpoint import MAX_REQUEST_SIZE, MetricsEndpoint
from tests.support.shared_memory import Shared, make_shared

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class FakeWorker:
    slot: int
    generation: int = 0
    stopping: bool = False
    killed: bool = False


@dataclass
class FakeMaster:
    """The supervision state the collector reads; the real one is `workers.WorkerPool`."""

    workers: dict[int, FakeWorker] = field(default_factory=dict)
    generation: int = 0
    target_workers: int = 2
    restarts: int = 0
    stopping: bool = False
    heartbeat_interval: float = 1.0
    listeners: tuple = ()


def _samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def shared() -> Iterator[Shared]:
    made = make_shared(10, slots=0)
    yield made
    made.close()


@pytest.fixture
def board(shared: Shared) -> Scoreboard:
    return shared.scoreboard


@pytest.fixture
def admission(shared: Shared) -> Admission:
    return shared.admission


def _serving(board: Scoreboard, master: FakeMaster, slot: int, generation: int = 0) -> None:
    """A worker in `slot` that has started and serves, as a forked one would report."""
    board.prepare(slot, generation, time.monotonic_ns())
    board.slot(slot)[STATE] = SlotState.SERVING
    master.workers[1000 + slot] = FakeWorker(slot, generation)


def _scrape(master: FakeMaster, board: Scoreboard, admission: Admission) -> Samples:
    registry = make_registry(ScoreboardCollector(master, board, admission))
    return _samples(generate_latest(registry).decode())


# -- the collector ------------------------------------------------------------------------


def test_totals_per_worker_values_and_names(board: Scoreboard, admission: Admission) -> None:
    master = FakeMaster(restarts=3)
    _serving(board, master, 0)
    _serving(board, master, 1)
    zero, one = board.slot(0), board.slot(1)
    zero[ACCEPTED], one[ACCEPTED] = 5, 7
    zero[REFUSED], one[REFUSED] = 2, 1
    zero[CONNECT_ERRORS] = 4
    zero[BYTES_TO_TARGET], one[BYTES_TO_TARGET] = 1000, 1 << 40
    zero[BYTES_TO_CLIENT], one[BYTES_TO_CLIENT] = 3, 9
    zero[ACTIVE], one[ACTIVE] = 1, 2
    admitter = admission.admitter(1)
    assert [admitter.admit(None) for _ in range(3)] == [ADMITTED] * 3

    samples = _scrape(master, board, admission)

    assert _value(samples, "forkproxy_connections_active") == 3  # the sum of HELD
    assert _value(samples, "forkproxy_connections_max") == 10
    assert _value(samples, "forkproxy_connections_accepted_total") == 12
    assert _value(samples, "forkproxy_connections_refused_total") == 3
    assert _value(samples, "forkproxy_backend_connect_errors_total") == 4  # deprecated alias
    relayed = "forkproxy_relayed_bytes_total"
    assert _value(samples, relayed, direction="to_target") == 1000 + (1 << 40)
    assert _value(samples, relayed, direction="to_client") == 12
    assert _value(samples, "forkproxy_workers", generation="current") == 2
    assert _value(samples, "forkproxy_workers", generation="draining") == 0
    assert _value(samples, "forkproxy_workers_target") == 2
    assert _value(samples, "forkproxy_worker_restarts_total") == 3
    per_worker = "forkproxy_worker_connections_accepted_total"
    assert _value(samples, per_worker, worker="0") == 5
    assert _value(samples, per_worker, worker="1") == 7
    assert _value(samples, "forkproxy_worker_connections_active", worker="1") == 2
    worker_bytes = "forkproxy_worker_relayed_bytes_total"
    assert _value(samples, worker_bytes, worker="1", direction="to_target") == 1 << 40
    assert _value(samples, worker_bytes, worker="0", direction="to_client") == 3
    engine = engine_name()
    assert _value(samples, "forkproxy_build_info", version=__version__, engine=engine) == 1
    assert not any(name.startswith("forkproxy_reload") for name, _ in samples)  # no reloader
    assert _value(samples, "process_cpu_seconds_total") >= 0
    assert _value(samples, "process_resident_memory_bytes") > 0
    # Slots that never had a worker are left out.
    assert not [key for key in samples if ("worker", "5") in key[1]]
    assert not [key for key in samples if ("direction", "to_backend") in key[1]]
    for _ in range(3):
        admitter.release(ADMITTED)


def test_help_texts_say_target_and_the_old_name_is_marked_deprecated(
    board: Scoreboard, admission: Admission
) -> None:
    master = FakeMaster()
    _serving(board, master, 0)
    text = generate_latest(make_registry(ScoreboardCollector(master, board, admission)))
    helps = {
        family.name: family.documentation
        for family in text_string_to_metric_families(text.decode())
    }
    assert helps["forkproxy_backend_connect_errors"].startswith(
        "Deprecated: use forkproxy_target_connect_errors_total"
    )
    del helps["forkproxy_backend_connect_errors"]
    for name, documentation in helps.items():
        assert "backend" not in documentation.lower(), name
        assert "upstream" not in documentation.lower(), name


def test_histograms_are_cumulative_with_seconds(board: Scoreboard, admission: Admission) -> None:
    master = FakeMaster()
    _serving(board, master, 0)
    _serving(board, master, 3)
    zero, three = board.slot(0), board.slot(3)
    zero[CONNECT_DURATION_BUCKETS + 0] = 2  # <= 0.0005 s
    three[CONNECT_DURATION_BUCKETS + 2] = 1  # <= 0.0025 s
    three[CONNECT_DURATION_BUCKETS + len(CONNECT_DURATION_BOUNDS)] = 1  # > 10 s
    zero[CONNECT_DURATION_SUM_NS] = 600_000
    three[CONNECT_DURATION_SUM_NS] = 12_002_000_000
    zero[CONNECTION_DURATION_BUCKETS + len(CONNECTION_DURATION_BOUNDS) - 1] = 4  # <= 3600 s
    zero[CONNECTION_DURATION_SUM_NS] = 4 * 3_000_000_000_000

    samples = _scrape(master, board, admission)

    connect = "forkproxy_connect_duration_seconds"
    assert _value(samples, connect + "_bucket", le="0.0005") == 2
    assert _value(samples, connect + "_bucket", le="0.001") == 2
    assert _value(samples, connect + "_bucket", le="0.0025") == 3
    assert _value(samples, connect + "_bucket", le="10.0") == 3
    assert _value(samples, connect + "_bucket", le="+Inf") == 4
    assert _value(samples, connect + "_count") == 4
    assert _value(samples, connect + "_sum") == pytest.approx(12.0026)
    lifetime = "forkproxy_connection_duration_seconds"
    assert _value(samples, lifetime + "_bucket", le="1800.0") == 0
    assert _value(samples, lifetime + "_bucket", le="3600.0") == 4
    assert _value(samples, lifetime + "_count") == 4
    assert _value(samples, lifetime + "_sum") == pytest.approx(12000.0)
    bounds = {labels[0][1] for name, labels in samples if name == connect + "_bucket"}
    assert len(bounds) == len(CONNECT_DURATION_BOUNDS) + 1


def test_a_dead_workers_counters_are_kept(board: Scoreboard, admission: Admission) -> None:
    """retire() folds a reaped worker's counters in: nothing goes backwards."""
    master = FakeMaster(target_workers=1)
    _serving(board, master, 0)
    slot = board.slot(0)
    slot[ACCEPTED] = 10
    slot[BYTES_TO_CLIENT] = 500
    slot[ACTIVE] = 1
    slot[CONNECTION_DURATION_BUCKETS] = 10
    before = _scrape(master, board, admission)

    del master.workers[1000]  # reaped ...
    board.retire(0)  # ... and its slot retired, as the master does
    dead = _scrape(master, board, admission)
    for key, value in before.items():
        if key[0].startswith("forkproxy_") and key[0].endswith(("_total", "_bucket", "_count")):
            assert dead[key] == value, key
    assert ("forkproxy_worker_connections_active", (("worker", "0"),)) not in dead
    assert _value(dead, "forkproxy_workers", generation="current") == 0

    master.restarts += 1
    _serving(board, master, 0)  # the replacement, in the same slot
    board.slot(0)[ACCEPTED] += 2
    board.slot(0)[BYTES_TO_CLIENT] += 1
    after = _scrape(master, board, admission)
    assert _value(after, "forkproxy_connections_accepted_total") == 12
    assert _value(after, "forkproxy_worker_connections_accepted_total", worker="0") == 12
    assert _value(after, "forkproxy_relayed_bytes_total", direction="to_client") == 501
    assert _value(after, "forkproxy_connection_duration_seconds_count") == 10
    assert _value(after, "forkproxy_worker_restarts_total") == 1


@dataclass
class FakeReloads:
    """The reload counters the collector reads; the real ones are `reload.Reloader`'s."""

    ok: int = 0
    failed: int = 0
    last_success: float | None = None


def test_reloads_and_generations(board: Scoreboard, admission: Admission) -> None:
    """After a reload: the old generation's workers count as draining, the counters and
    the time of the last good reload as the (re-executed) master kept them."""
    master = FakeMaster(generation=1)
    _serving(board, master, 0, generation=0)
    _serving(board, master, 1, generation=0)
    _serving(board, master, 2, generation=1)
    reloads = FakeReloads()
    registry = make_registry(ScoreboardCollector(master, board, admission, reloads))
    never = _samples(generate_latest(registry).decode())
    assert _value(never, "forkproxy_reloads_total", result="ok") == 0
    assert _value(never, "forkproxy_last_reload_success_timestamp_seconds") == 0
    reloads.ok, reloads.failed, reloads.last_success = 3, 2, 1_700_000_000.5
    samples = _samples(generate_latest(registry).decode())
    assert _value(samples, "forkproxy_workers", generation="current") == 1
    assert _value(samples, "forkproxy_workers", generation="draining") == 2
    assert _value(samples, "forkproxy_reloads_total", result="ok") == 3
    assert _value(samples, "forkproxy_reloads_total", result="failed") == 2
    assert _value(samples, "forkproxy_last_reload_success_timestamp_seconds") == 1_700_000_000.5


def _all_serving(board: Scoreboard, master: FakeMaster) -> None:
    pass


def _one_starting(board: Scoreboard, master: FakeMaster) -> None:
    board.slot(1)[STATE] = SlotState.STARTING


def _one_reaped(board: Scoreboard, master: FakeMaster) -> None:
    del master.workers[1001]


def _stopping(board: Scoreboard, master: FakeMaster) -> None:
    master.stopping = True


def _one_fewer_wanted(board: Scoreboard, master: FakeMaster) -> None:
    """SIGTTOU: the extra worker drains; it no longer counts."""
    master.target_workers = 1
    master.workers[1001].stopping = True
    board.slot(1)[STATE] = SlotState.DRAINING


def _one_killed(board: Scoreboard, master: FakeMaster) -> None:
    """A hung worker the master has SIGKILLed and not yet reaped."""
    master.workers[1001].killed = True


def _one_frozen(board: Scoreboard, master: FakeMaster) -> None:
    """SIGSTOPped, or its loop stuck: its last heartbeat is 3 intervals and a bit old."""
    board.slot(1)[HEARTBEAT_NS] = time.monotonic_ns() - 3_100_000_000


def _one_late_by_less_than_three_beats(board: Scoreboard, master: FakeMaster) -> None:
    board.slot(1)[HEARTBEAT_NS] = time.monotonic_ns() - 2_000_000_000


def _all_frozen(board: Scoreboard, master: FakeMaster) -> None:
    for slot in (0, 1):
        board.slot(slot)[HEARTBEAT_NS] = time.monotonic_ns() - 10_000_000_000


def _new_generation_starting(board: Scoreboard, master: FakeMaster) -> None:
    """SIGHUP: the old generation still serves but is no longer current."""
    master.generation = 1
    _serving(board, master, 2, generation=1)
    _serving(board, master, 3, generation=1)
    board.slot(2)[STATE] = SlotState.STARTING


def _new_generation_serving(board: Scoreboard, master: FakeMaster) -> None:
    master.generation = 1
    _serving(board, master, 2, generation=1)
    _serving(board, master, 3, generation=1)


@pytest.mark.parametrize(
    ("arrange", "healthy", "reason"),
    [
        (_all_serving, True, "2 of 2 workers serving"),
        (_one_starting, False, "1 of 2 workers serving"),
        (_one_reaped, False, "1 of 2 workers serving"),
        (_stopping, False, "stopping"),
        (_one_fewer_wanted, True, "1 of 1 workers serving"),
        (_one_killed, False, "1 of 2 workers serving"),
        (_one_frozen, False, "1 of 2 workers serving, 1 not responding"),
        (_one_late_by_less_than_three_beats, True, "2 of 2 workers serving"),
        (_all_frozen, False, "0 of 2 workers serving, 2 not responding"),
        (_new_generation_starting, False, "1 of 2 workers serving"),
        (_new_generation_serving, True, "2 of 2 workers serving"),
    ],
)
def test_health(
    board: Scoreboard,
    admission: Admission,
    arrange: Callable[[Scoreboard, FakeMaster], None],
    healthy: bool,
    reason: str,
) -> None:
    master = FakeMaster()
    _serving(board, master, 0)
    _serving(board, master, 1)
    arrange(board, master)
    assert ScoreboardCollector(master, board, admission).health() == (healthy, reason)


def test_promtool_finds_nothing_to_complain_about(board: Scoreboard, admission: Admission) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (apt-get install prometheus) and $CI is set")
        pytest.skip("promtool is missing (Debian package prometheus)")
    master = FakeMaster()
    _serving(board, master, 0)
    board.slot(0)[ACCEPTED] = 1
    board.slot(0)[CONNECT_DURATION_BUCKETS + 1] = 1
    collector = ScoreboardCollector(master, board, admission, FakeReloads(1, 1, time.time()))
    text = generate_latest(make_registry(collector))
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, b"")


# -- the HTTP responder -------------------------------------------------------------------


class Served:
    """A MetricsEndpoint on a real listening socket, and the selector loop that drives it."""

    def __init__(
        self,
        family: int,
        directory: Path,
        render: Callable[[], bytes],
        health: Callable[[], tuple[bool, str]],
        client_timeout: float = 10.0,
        max_clients: int = 16,
    ) -> None:
        if family == socket.AF_UNIX:
            self.address: str | tuple[str, int] = str(
                directory / f"metrics-{time.monotonic_ns()}.sock"
            )
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(self.address)
            sock.listen(64)
        else:
            sock = socket.create_server(("127.0.0.1", 0), backlog=64)
            self.address = sock.getsockname()
        sock.setblocking(False)
        self.family = family
        self.listener = Listener(sock, "metrics", "test")
        self.selector = selectors.DefaultSelector()
        self.endpoint = MetricsEndpoint(
            [self.listener], self.selector, render, health, client_timeout, max_clients
        )

    def connect(self) -> socket.socket:
        client = socket.socket(self.family, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(self.address)
        return client

    def pump(self, condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        """Run the loop (as the master does) until `condition` holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            for key, _ in self.selector.select(0.05):
                key.data()

    def answered(self) -> bool:
        """Every client has its whole response sent (or is gone)."""
        return all(client.lingering for client in self.endpoint.clients)

    def exchange(self, request: bytes) -> bytes:
        """Send `request`, return everything the endpoint sends back before closing."""
        with self.connect() as client:
            client.sendall(request)
            self.pump(lambda: bool(self.endpoint.clients) and self.answered(), "a response")
            response = _read_to_eof(client)
        self.pump(lambda: not self.endpoint.clients, "the endpoint to close")
        return response

    def close(self) -> None:
        self.endpoint.close()
        self.selector.close()
        self.listener.sock.close()


def _read_to_eof(client: socket.socket) -> bytes:
    received = bytearray()
    while chunk := client.recv(1 << 16):
        received += chunk
    return bytes(received)


def _split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return status_line, headers, body


@pytest.fixture
def served(workdir: Path) -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(
        family: int = socket.AF_INET,
        render: Callable[[], bytes] = lambda: b"metric_a 1\n",
        health: Callable[[], tuple[bool, str]] = lambda: (True, "2 of 2 workers serving"),
        client_timeout: float = 10.0,
        max_clients: int = 16,
    ) -> Served:
        made.append(Served(family, workdir, render, health, client_timeout, max_clients))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX])
def test_get_metrics(served: Callable[..., Served], family: int) -> None:
    server = served(family)
    status, headers, body = _split(server.exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["Content-Length"] == str(len(body))
    assert headers["Connection"] == "close"
    assert body == b"metric_a 1\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "body"),
    [
        (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", "HTTP/1.1 200 OK", b"metric_a 1\n"),
        (b"GET /metrics HTTP/1.1\n\n", "HTTP/1.1 200 OK", b"metric_a 1\n"),  # bare LFs
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK", b""),
        (b"GET /healthz HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK", b"2 of 2 workers serving\n"),
        (
            b"GET / HTTP/1.1\r\n\r\n",
            "HTTP/1.1 404 Not Found",
            b"not found: try /metrics, /healthz or /status\n",
        ),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found", None),
        (b"POST /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 405 Method Not Allowed", None),
        (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request", None),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "HTTP/1.1 400 Bad Request", None),
    ],
)
def test_paths_and_methods(
    served: Callable[..., Served], request_bytes: bytes, status: str, body: bytes | None
) -> None:
    got_status, headers, got_body = _split(served().exchange(request_bytes))
    assert got_status == status
    if body is not None:
        assert got_body == body
    if request_bytes.startswith(b"HEAD"):
        assert headers["Content-Length"] == "11"  # the GET body's length, without the body
    if status.endswith("Method Not Allowed"):
        assert headers["Allow"] == "GET, HEAD"


def test_healthz_503_says_why(served: Callable[..., Served]) -> None:
    server = served(health=lambda: (False, "1 of 2 workers serving"))
    status, headers, body = _split(server.exchange(b"GET /healthz HTTP/1.1\r\n\r\n"))
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert body == b"1 of 2 workers serving\n"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (b"/healthz", b"no target\n"),
        (b"/healthz?verbose", b"no target\nlistener 'web': 0 of 1 targets up\n"),
        (b"/healthz?x=1&verbose", b"no target\nlistener 'web': 0 of 1 targets up\n"),
        (b"/status", b"no target\nlistener 'web': 0 of 1 targets up\n"),
    ],
)
def test_verbose_health_and_status(served: Callable[..., Served], path: bytes, body: bytes) -> None:
    server = served(health=lambda: (False, "no target"))
    server.endpoint.status = lambda: (False, "no target\nlistener 'web': 0 of 1 targets up")
    status, _, got = _split(server.exchange(b"GET " + path + b" HTTP/1.1\r\n\r\n"))
    assert (status, got) == ("HTTP/1.1 503 Service Unavailable", body)


def test_a_request_in_pieces_is_answered_once_whole(served: Callable[..., Served]) -> None:
    server = served()
    request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
    with server.connect() as client:
        for count in range(1, len(request)):
            client.send(request[count - 1 : count])
            server.pump(
                lambda: [len(c.head) for c in server.endpoint.clients] == [count],  # noqa: B023
                "the endpoint to read the byte",
            )
            assert not server.answered()
        client.send(request[-1:])
        server.pump(server.answered, "the response")
        status, _, body = _split(_read_to_eof(client))
    assert (status, body) == ("HTTP/1.1 200 OK", b"metric_a 1\n")


def test_an_oversized_request_gets_431_and_is_closed(served: Callable[..., Served]) -> None:
    server = served()
    request = b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * MAX_REQUEST_SIZE
    status, _, _ = _split(server.exchange(request))
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"


def test_input_after_the_request_does_not_reset_the_response(
    served: Callable[..., Served],
) -> None:
    """Unread input at close() would send RST and could destroy the response in flight."""
    body = os.urandom(1 << 20)
    server = served(family=socket.AF_INET, render=lambda: body)
    response = server.exchange(b"GET /metrics HTTP/1.1\r\n\r\n" + b"trailing junk" * 5000)
    assert _split(response)[2] == body


def test_partial_writes_wait_for_writability(served: Callable[..., Served]) -> None:
    body = os.urandom(8 << 20)  # far more than a unix socket buffers
    server = served(family=socket.AF_UNIX, render=lambda: body)
    with server.connect() as client:
        client.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        server.pump(
            lambda: any(c.events == selectors.EVENT_WRITE for c in server.endpoint.clients),
            "the endpoint to wait for room to write",
        )
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(_read_to_eof(client)))
        reader.start()
        server.pump(server.answered, "the whole response")
        reader.join(10)
    server.pump(lambda: not server.endpoint.clients, "the endpoint to close")
    assert _split(received[0])[2] == body


@pytest.mark.parametrize("sent", [b"", b"GET /metr"])
def test_a_slow_or_silent_client_is_dropped_at_its_deadline(
    served: Callable[..., Served], sent: bytes
) -> None:
    server = served(client_timeout=5.0)
    assert server.endpoint.next_deadline() == float("inf")
    with server.connect() as client:
        before = time.monotonic()
        if sent:
            client.sendall(sent)
        server.pump(lambda: bool(server.endpoint.clients), "the accept")
        if sent:
            server.pump(
                lambda: all(c.head == sent for c in server.endpoint.clients), "the partial read"
            )
        deadline = server.endpoint.next_deadline()
        assert before + 5.0 <= deadline <= time.monotonic() + 5.0
        server.endpoint.run_deadlines(deadline - 0.001)  # not yet
        assert len(server.endpoint.clients) == 1
        server.endpoint.run_deadlines(deadline)
        assert not server.endpoint.clients
        assert server.endpoint.next_deadline() == float("inf")
        assert client.recv(1) == b""  # dropped without a response


def test_idle_clients_cannot_starve_a_probe(served: Callable[..., Served]) -> None:
    """50 idle connections, twice the limit: a probe is still answered, and each new
    client pushed out the oldest idle one rather than waiting in the backlog."""
    server = served(max_clients=25)
    endpoint = server.endpoint
    idle = []
    try:
        for count in range(1, 51):
            idle.append(server.connect())
            server.pump(
                lambda: (
                    len(endpoint.clients) == min(count, 25)  # noqa: B023
                    and endpoint.accepting
                ),
                f"idle client {count} to be accepted",
            )
        with server.connect() as probe:
            probe.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            server.pump(lambda: any(c.lingering for c in endpoint.clients), "the answer")
            assert _split(_read_to_eof(probe))[2] == b"2 of 2 workers serving\n"
        assert idle[0].recv(1) == b""  # the oldest idle ones were closed for the newer
        server.pump(lambda: len(endpoint.clients) == 24, "24 idle clients left")
    finally:
        for client in idle:
            client.close()
    server.pump(lambda: not endpoint.clients, "all clients closed")


def test_a_new_client_pushes_out_an_idle_one_before_an_answered_one(
    served: Callable[..., Served],
) -> None:
    server = served(max_clients=2)
    endpoint = server.endpoint
    with server.connect() as answered, server.connect() as idle:
        answered.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        server.pump(lambda: len(endpoint.clients) == 2 and server.answered() is False, "two")
        server.pump(
            lambda: any(client.lingering for client in endpoint.clients), "the first answer"
        )
        with server.connect() as third:
            third.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            server.pump(lambda: all(c.lingering for c in endpoint.clients), "the third answer")
            assert idle.recv(1) == b""  # pushed out, unanswered
            assert _split(_read_to_eof(answered))[2] == b"metric_a 1\n"  # kept
            assert _split(_read_to_eof(third))[2] == b"2 of 2 workers serving\n"
    server.pump(lambda: not endpoint.clients, "all clients closed")


def test_a_failing_collector_gives_500_and_the_endpoint_goes_on(
    served: Callable[..., Served],
) -> None:
    calls: list[int] = []

    def render() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return b"metric_a 2\n"

    server = served(render=render)
    status, _, _ = _split(server.exchange(b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert status == "HTTP/1.1 500 Internal Server Error"
    status, _, body = _split(server.exchange(b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert (status, body) == ("HTTP/1.1 200 OK", b"metric_a 2\n")


def test_close_closes_every_client(served: Callable[..., Served]) -> None:
    server = served()
    with server.connect() as client:
        server.pump(lambda: bool(server.endpoint.clients), "the accept")
        server.endpoint.close()
        assert not server.endpoint.clients
        assert client.recv(1) == b""


# -- the --metrics option -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "family", "sockaddr"),
    [
        ("127.0.0.1:9100", socket.AF_INET, ("127.0.0.1", 9100)),
        ("[::1]:9100", socket.AF_INET6, ("::1", 9100, 0, 0)),
        ("0.0.0.0:9100", socket.AF_INET, ("0.0.0.0", 9100)),
        ("/run/forkproxy/metrics.sock", socket.AF_UNIX, "/run/forkproxy/metrics.sock"),
        ("@forkproxy-metrics", socket.AF_UNIX, "\0forkproxy-metrics"),
    ],
)
def test_metrics_addresses(text: str, family: int, sockaddr: object) -> None:
    address = parse_metrics(text)
    assert (address.text, address.name, address.family, address.sockaddr) == (
        text,
        "metrics",
        family,
        sockaddr,
    )
    assert not address.dual_stack


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "invalid metrics address '': empty address"),
        (
            "9100",
            "invalid metrics address '9100': give the address to listen on too, as in "
            "127.0.0.1:9100 (a bare port would listen on every interface)",
        ),
        (
            "localhost:9100",
            "invalid metrics address 'localhost:9100': 'localhost' is not an IP address "
            "(write IPV4:PORT, [IPV6]:PORT, /path or @name)",
        ),
        ("127.0.0.1", "invalid metrics address '127.0.0.1': missing ':PORT'"),
        ("127.0.0.1:0", "invalid metrics address '127.0.0.1:0': port 0 is not in 1-65535"),
        (
            "::1:9100",
            "invalid metrics address '::1:9100': write IPv6 addresses in brackets, "
            "as in '[::1]:80'",
        ),
        ("a\0b", "invalid metrics address 'a\\x00b': contains a NUL character"),
    ],
)
def test_bad_metrics_addresses(text: str, error: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_metrics(text)
    assert str(caught.value) == error


def test_metrics_option() -> None:
    assert parse_args(["x:1"]).metrics is None
    config = parse_args(["--metrics", "127.0.0.1:9100", "x:1"])
    assert config.metrics == parse_metrics("127.0.0.1:9100")
    assert parse_args(["--metrics=/run/m.sock", "x:1"]).metrics == parse_metrics("/run/m.sock")


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["--metrics=/run/a.sock", "--listen=/run/a.sock", "x:1"],
            "--metrics=/run/a.sock is also a --listen= address",
        ),
        (
            ["--metrics=127.0.0.1:80", "--listen=127.0.0.1:80", "x:1"],
            "--metrics=127.0.0.1:80 is also a --listen= address",
        ),
        (
            ["--listen=metrics=127.0.0.1:80", "x:1"],
            "--listen= name 'metrics' is kept for the metrics socket: use --metrics=",
        ),
    ],
)
def test_metrics_option_conflicts(argv: list[str], error: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_args(argv)
    assert str(caught.value) == error


def test_unix_socket_mode_follows_socket_mode(workdir: Path) -> None:
    """--metrics=/path is created like --listen=/path: --socket-mode, default 0666."""
    for argv, mode in ((["x:1"], 0o666), (["--socket-mode=0600", "x:1"], 0o600)):
        path = workdir / "m.sock"
        config = parse_args([f"--metrics={path}", *argv])
        assert config.metrics is not None
        listener = bind_listener(config.metrics, config.socket_mode)
        assert stat.S_IMODE(path.stat().st_mode) == mode
        close_listeners([listener])
        assert not path.exists()


def _run_as_the_master(server: Served, condition: Callable[[], bool], what: str) -> None:
    """The master's loop: wait for events or the endpoint's deadline, then run_deadlines
    (after every wakeup, as the master calls it)."""
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        timeout = min(0.05, max(0.0, server.endpoint.next_deadline() - time.monotonic()))
        for key, _ in server.selector.select(timeout):
            key.data()
        server.endpoint.run_deadlines(time.monotonic())


def test_at_start_up_a_health_request_waits_until_healthy(served: Callable[..., Served]) -> None:
    """Under socket activation the probe that started forkproxy is read before any worker
    serves: it gets its 200 once they do, not a 503 at once; /metrics is not held."""
    healthy = [False]
    server = served(health=lambda: (healthy[0], f"{2 if healthy[0] else 0} of 2 workers serving"))
    endpoint = server.endpoint
    endpoint.start_deadline = math.inf  # the start-up timeout, never reached here
    with server.connect() as probe, server.connect() as scrape:
        probe.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        scrape.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        _run_as_the_master(
            server,
            lambda: len(endpoint.held) == 1 and sum(c.lingering for c in endpoint.clients) == 1,
            "the probe held and the scrape answered",
        )
        assert _split(_read_to_eof(scrape))[2] == b"metric_a 1\n"
        healthy[0] = True
        _run_as_the_master(server, lambda: not endpoint.held, "the probe answered")
        assert _split(_read_to_eof(probe)) == (
            "HTTP/1.1 200 OK",
            {
                "Content-Type": "text/plain; charset=utf-8",
                "Content-Length": "23",
                "Cache-Control": "no-store",
                "Connection": "close",
            },
            b"2 of 2 workers serving\n",
        )
    _run_as_the_master(server, lambda: not endpoint.clients, "both closed")
    # Started: from now on health is answered at once, a 503 too.
    healthy[0] = False
    assert _split(server.exchange(b"GET /status HTTP/1.1\r\n\r\n"))[0] == (
        "HTTP/1.1 503 Service Unavailable"
    )


def test_a_held_health_request_gets_503_at_the_start_deadline(
    served: Callable[..., Served],
) -> None:
    server = served(health=lambda: (False, "0 of 2 workers serving"))
    endpoint = server.endpoint
    endpoint.start_deadline = time.monotonic() + 0.2
    with server.connect() as probe:
        probe.sendall(b"GET /healthz?verbose HTTP/1.1\r\n\r\n")
        _run_as_the_master(server, lambda: bool(endpoint.held), "the probe held")
        _run_as_the_master(server, lambda: not endpoint.held, "the start deadline")
        assert _split(_read_to_eof(probe))[::2] == (
            "HTTP/1.1 503 Service Unavailable",
            b"0 of 2 workers serving\n",
        )
    assert endpoint.start_deadline == -math.inf


def test_a_held_client_that_leaves_is_forgotten(served: Callable[..., Served]) -> None:
    server = served(health=lambda: (False, "0 of 2 workers serving"))
    endpoint = server.endpoint
    endpoint.start_deadline = math.inf
    with server.connect() as probe:
        probe.sendall(b"GET /healthz HTTP/1.1\r\n\r\nmore input is ignored")
        _run_as_the_master(server, lambda: bool(endpoint.held), "the probe held")
    _run_as_the_master(server, lambda: not endpoint.clients and not endpoint.held, "its close")
