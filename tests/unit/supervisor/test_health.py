"""Active health checks on real sockets, driven by a real selector as the master's loop
drives them: rise and fall, the reasons (refused, timeout, HTTP 503, no or no HTTP
response), what a check sends (Host header, PROXY header), a reload's inherited state,
and host names resolved in a child process."""

import http.server
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest

from forkproxy.relay.proxy_protocol import V2_SIGNATURE
from forkproxy.settings.address import parse_target
from forkproxy.settings.config import Config
from forkproxy.shared.listener import Listener
from forkproxy.shared.targets_table import CheckReason
from forkproxy.supervisor.health import CheckedTarget, Checker, CheckState, describe, host_header
from forkproxy.supervisor.probe import Probe
from forkproxy.supervisor.resolver import Resolution
from forkproxy.supervisor.target_rows import TargetRows
from tests.support.shared_memory import Shared, make_shared


@dataclass
class Checks:
    rows: TargetRows
    checker: Checker
    selector: selectors.BaseSelector

    def row(self, target: str) -> int:
        return next(entry.row for entry in self.rows.entries if entry.target.text == target)

    def up(self, target: str) -> bool:
        return self.rows.table.is_up(self.row(target))

    def reason(self, target: str) -> tuple[CheckReason, int]:
        _, reason, detail, _, _ = self.rows.table.check_state(self.row(target))
        return reason, detail

    def run_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """The master's loop: wait for events or the nearest deadline, until `condition`."""
        deadline = time.monotonic() + timeout
        while not condition():
            now = time.monotonic()
            assert now < deadline, "the checks did not get there in time"
            wait = min(self.checker.next_deadline(), deadline) - now
            for key, _ in self.selector.select(max(0.0, wait)):
                key.data()
            self.checker.run_deadlines(time.monotonic())

    def checks_done(self, target: str) -> int:
        """Checks in a row so far (passed or failed) of `target`."""
        return abs(self.rows.table.check_state(self.row(target))[0])


@pytest.fixture
def shared() -> Iterator[Shared]:
    made = make_shared(8, slots=0)
    yield made
    made.close()


@pytest.fixture
def make_checks(shared: Shared) -> Iterator[Callable[..., Checks]]:
    made: list[Checks] = []
    sockets: list[socket.socket] = []

    def make(targets: Sequence[str], kind: int = socket.SOCK_STREAM, **options: object) -> Checks:
        options.setdefault("check_interval", 0.02)
        config = Config(targets=tuple(parse_target(t) for t in targets), **options)
        sock = socket.socket(socket.AF_INET, kind)
        sockets.append(sock)
        listener = Listener(sock, "web", "127.0.0.1:0", kind=kind)
        rows = TargetRows.set_up(config, [listener], shared.mapping, shared.scoreboard)
        selector = selectors.DefaultSelector()
        checks = Checks(rows, Checker(selector, rows, shared.mapping), selector)
        made.append(checks)
        return checks

    yield make
    for checks in made:
        checks.checker.close()
        checks.selector.close()
        checks.rows.close()
    for sock in sockets:
        sock.close()


def _bound_not_listening() -> socket.socket:
    """A port nobody listens on (and nobody else takes while we hold it): refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


# -- rise and fall --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("results", "rise", "fall", "up_after"),
    [
        ("", 2, 3, [True]),
        ("ff", 2, 3, [True, True, True]),
        ("fff", 2, 3, [True, True, True, False]),
        ("fffpfff", 2, 3, [True, True, True, False, False, False, False, False]),
        ("fffpp", 2, 3, [True, True, True, False, False, True]),
        ("fpfpfp", 1, 2, [True] * 7),
        ("ffp", 1, 1, [True, False, False, True]),
    ],
)
def test_rise_and_fall(results: str, rise: int, fall: int, up_after: list[bool]) -> None:
    state = CheckState(rise, fall)
    seen = [state.up]
    for result in results:
        state.record(result == "p")
        seen.append(state.up)
    assert seen == up_after


def test_a_refused_target_goes_down_after_fall_checks_and_comes_back_after_rise(
    make_checks: Callable[..., Checks], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "forkproxy")
    port = _bound_not_listening()
    with port:
        target = _address(port)
        checks = make_checks([target], check_fall=2, check_rise=3)
        assert checks.up(target)
        checks.run_until(lambda: checks.checks_done(target) >= 1)
        assert checks.up(target)  # one failure is not enough
        checks.run_until(lambda: not checks.up(target))
        assert checks.reason(target) == (CheckReason.REFUSED, 111)
        checks.run_until(lambda: checks.checks_done(target) >= 5)
        port.listen(64)  # the target starts
        checks.run_until(lambda: checks.checks_done(target) >= 2 and checks.reason(target)[0] == 0)
        assert not checks.up(target)  # two passes of three
        checks.run_until(lambda: checks.up(target))
    lines = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.getMessage().startswith("target '")
    ]
    assert lines == [
        (
            "WARNING",
            f"target '{target}' of listener 'web' is down: connection refused "
            "(2 checks failed in a row)",
        ),
        ("NOTICE", f"target '{target}' of listener 'web' is up (3 checks passed in a row)"),
    ]
    cumulative, sum_ns = checks.checker.histogram()
    assert cumulative[-1] >= 8 and sum_ns > 0  # 5 failed, 3 passed, at least


def test_a_reload_keeps_a_down_target_down(
    make_checks: Callable[..., Checks], shared: Shared
) -> None:
    with _bound_not_listening() as port:
        target = _address(port)
        checks = make_checks([target], check_fall=1, check_rise=2)
        checks.run_until(lambda: not checks.up(target))
        checks.checker.close()
        again = make_checks([target], check_fall=1, check_rise=2)  # the same mapping
        assert again.row(target) == checks.row(target)
        assert not again.up(target) and again.checker.targets[0].state.up is False
        port.listen(64)
        again.run_until(lambda: again.checks_done(target) >= 1 and again.reason(target)[0] == 0)
        assert not again.up(target)  # it needs its rise, as before the reload
        again.run_until(lambda: again.up(target))


def test_without_checks_rows_are_up_and_nothing_is_checked(
    make_checks: Callable[..., Checks],
) -> None:
    with _bound_not_listening() as port:
        checks = make_checks([_address(port)], check_interval=0)
        assert checks.checker.targets == [] and not checks.checker.enabled
        assert checks.up(_address(port))
        assert checks.checker.next_deadline() == float("inf")


def test_datagram_targets_are_not_checked(make_checks: Callable[..., Checks]) -> None:
    checks = make_checks(["udp:127.0.0.1:9"], kind=socket.SOCK_DGRAM)
    assert checks.checker.targets == [] and checks.up("udp:127.0.0.1:9")


# -- HTTP -----------------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]]
    status: int

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append((self.path, self.headers.get("Host")))
        body = b"ok\n"
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[Callable[[int], tuple[str, list[tuple[str, str | None]]]]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(status: int) -> tuple[str, list[tuple[str, str | None]]]:
        seen: list[tuple[str, str | None]] = []
        handler = type("Handler", (_Recorder,), {"seen": seen, "status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_http_503_is_down_although_it_connects_and_200_is_up(
    make_checks: Callable[..., Checks],
    http_server: Callable[[int], tuple[str, list[tuple[str, str | None]]]],
) -> None:
    failing, failing_seen = http_server(503)
    healthy, healthy_seen = http_server(200)
    checks = make_checks([failing, healthy], check_http="/health?deep=1", check_fall=2)
    checks.run_until(lambda: not checks.up(failing))
    checks.run_until(lambda: checks.checks_done(healthy) >= 3)
    assert checks.up(healthy)
    assert checks.reason(failing) == (CheckReason.HTTP_STATUS, 503)
    assert describe(*checks.reason(failing)) == "HTTP 503"
    assert failing_seen[0] == ("/health?deep=1", failing)  # Host: the target
    assert set(healthy_seen) == {("/health?deep=1", healthy)}


def test_redirects_pass(
    make_checks: Callable[..., Checks],
    http_server: Callable[[int], tuple[str, list[tuple[str, str | None]]]],
) -> None:
    target, _ = http_server(302)
    checks = make_checks([target], check_http="/", check_fall=1)
    checks.run_until(lambda: checks.checks_done(target) >= 3)
    assert checks.up(target) and checks.reason(target)[0] == CheckReason.PASSED


def _serve_raw(answer: Callable[[socket.socket], None]) -> tuple[str, list[bytes], socket.socket]:
    """A target whose every connection gets `answer(connection)`; what each sent first."""
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                try:
                    received.append(connection.recv(4096))
                    answer(connection)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return _address(server), received, server


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"", CheckReason.NO_RESPONSE),
        (b"SSH-2.0-OpenSSH_9.2\r\n", CheckReason.BAD_RESPONSE),
        (b"HTTP/1.1 500 Internal Server Error\r\n\r\n", CheckReason.HTTP_STATUS),
    ],
)
def test_what_is_no_http_answer(
    make_checks: Callable[..., Checks], reply: bytes, reason: CheckReason
) -> None:
    target, _, server = _serve_raw(lambda connection: connection.sendall(reply))
    with server:
        checks = make_checks([target], check_http="/", check_fall=1)
        checks.run_until(lambda: not checks.up(target))
        assert checks.reason(target)[0] == reason


def test_a_target_that_never_answers_times_out(make_checks: Callable[..., Checks]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never reads
        target = _address(silent)
        checks = make_checks([target], check_http="/", check_fall=1, check_timeout=0.1)
        checks.run_until(lambda: not checks.up(target))
        assert checks.reason(target)[0] == CheckReason.TIMEOUT
        assert describe(CheckReason.TIMEOUT, 110, 0.1) == "timed out after 100ms"


@pytest.mark.parametrize(
    ("version", "http", "first"),
    [
        (1, True, b"PROXY UNKNOWN\r\nGET /ready HTTP/1.1\r\n"),
        (2, True, V2_SIGNATURE + b"\x20\x00\x00\x00GET /ready HTTP/1.1\r\n"),
        (1, False, b"PROXY UNKNOWN\r\n"),
    ],
)
def test_a_check_sends_the_proxy_header_of_its_listener(
    make_checks: Callable[..., Checks], version: int, http: bool, first: bytes
) -> None:
    target, received, server = _serve_raw(
        lambda connection: connection.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    )
    with server:
        checks = make_checks(
            [target], check_http="/ready" if http else "", proxy_protocol=version, check_fall=1
        )
        checks.run_until(lambda: len(received) >= 2)
        assert checks.up(target)
        assert received[0].startswith(first)
        if http:
            assert f"\r\nHost: {target}\r\n".encode() in received[0]


def test_host_headers() -> None:
    assert host_header(parse_target("[::1]:8080")) == "[::1]:8080"
    assert host_header(parse_target("[fe80::1%lo]:80")) == "[fe80::1]:80"
    assert host_header(parse_target("example.com:80")) == "example.com:80"
    assert host_header(parse_target("/run/app.sock")) == "localhost"


def test_a_unix_socket_that_does_not_exist(make_checks: Callable[..., Checks]) -> None:
    path = f"/tmp/fp-missing-{os.getpid()}-{time.monotonic_ns()}.sock"
    checks = make_checks([path], check_fall=1)
    checks.run_until(lambda: not checks.up(path))
    assert describe(*checks.reason(path)) == "no such socket"


# -- host names -------------------------------------------------------------------------------


def _resolve(host: str) -> tuple[list[object] | None, str]:
    selector = selectors.DefaultSelector()
    answers: list[tuple[list[object] | None, str]] = []
    resolution = Resolution(
        selector, host, 80, socket.SOCK_STREAM, lambda found, why: answers.append((found, why))
    )
    try:
        deadline = time.monotonic() + 30
        while not answers and time.monotonic() < deadline:
            for key, _ in selector.select(1):
                key.data()
    finally:
        resolution.close()
        selector.close()
        os.waitpid(resolution.pid, 0)  # the master reaps it on SIGCHLD
    assert answers, "no answer from the resolver process"
    return answers[0]


def test_a_host_name_is_resolved_in_a_child_process() -> None:
    addresses, why = _resolve("localhost")
    assert addresses and why == ""
    assert any(sockaddr[0] in ("127.0.0.1", "::1") for _, sockaddr in addresses)


def test_a_name_that_does_not_resolve_says_why() -> None:
    addresses, why = _resolve("no-such-host.invalid")
    assert addresses is None and why


# -- a bug in a check is not the master's end ---------------------------------------------------


def test_an_exception_in_a_check_fails_the_check_and_is_logged(
    make_checks: Callable[..., Checks],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(self: Probe) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Probe, "_on_ready", broken)
    with socket.create_server(("127.0.0.1", 0)) as server:
        target = _address(server)
        checks = make_checks([target], check_fall=1)
        checks.run_until(lambda: not checks.up(target))
    assert checks.reason(target)[0] == CheckReason.ERROR
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"internal error checking target '{target}', going on: RuntimeError('a bug')"]


def test_an_exception_starting_a_check_is_tried_again_at_the_next_interval(
    make_checks: Callable[..., Checks],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[float] = []

    def broken(self: CheckedTarget, now: float) -> None:
        calls.append(now)
        raise RuntimeError("a bug")

    monkeypatch.setattr(CheckedTarget, "start", broken)
    with socket.create_server(("127.0.0.1", 0)) as server:
        checks = make_checks([_address(server)])
        checks.run_until(lambda: len(calls) >= 3)
    # Not at once: each retry waits for the next interval (0.02s).
    assert all(later - earlier > 0.019 for earlier, later in itertools.pairwise(calls))
    assert [r.levelname for r in caplog.records if "internal error" in r.getMessage()] == ["ERROR"]
