"""The relay options, through the real program.

PROXY protocol to a real nginx and to an in-test strict decoder, connect and idle
timeouts, --on-limit=queue, the per-source cap, routes by listener name under
systemd-socket-activate, several targets, keep-alive and TCP_NODELAY on both sides.
"""

import http.client
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.support.counting import CountingBackend, outcome
from tests.support.nginx import NginxFactory, read_to_eof, require_nginx
from tests.support.proxy import (
    FORKPROXY,
    Proxy,
    run_backend,
    run_cli,
    run_proxy,
    send_all_then_read,
    wait_until,
)
from tests.support.proxy_protocol_decoder import ProxyHeader, read_header

# -- helpers ------------------------------------------------------------------------------


class HeaderBackend:
    """Reads a PROXY header from every connection with the strict test decoder, keeps
    it, then answers b"ok " + the bytes that followed it, and closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.headers: list[tuple[ProxyHeader, bytes]] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    header, rest = read_header(conn, timeout=10)
                    while not rest.endswith(b"\n"):
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        rest += chunk
                    self.headers.append((header, rest))
                    conn.sendall(b"ok " + rest)
                except BaseException as error:  # reported by the test
                    self.errors.append(error)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def header_backend() -> Iterator[HeaderBackend]:
    backend = HeaderBackend()
    try:
        yield backend
    finally:
        backend.close()


def _has_metrics() -> bool:
    return "--metrics" in run_cli(["--help"]).stdout


def _scrape(address: tuple[str, int]) -> dict[str, float]:
    connection = http.client.HTTPConnection(address[0], address[1], timeout=10)
    try:
        connection.request("GET", "/metrics")
        body = connection.getresponse().read().decode()
    finally:
        connection.close()
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            samples[name] = float(number)
    return samples


def _dead_target() -> str:
    """A 127.0.0.1 port nothing listens on (connect is refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def _client_from(source: str, proxy: Proxy) -> socket.socket:
    """A client bound to `source` (any 127.0.0.0/8 address is local) connected to the proxy."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(proxy.listeners[0].getsockname())
    return sock


# -- PROXY protocol -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "listener", "client_host"),
    [
        ("-p", "tcp", "127.0.0.1"),
        ("--proxy-protocol=v1", "tcp6", "::1"),
        ("--proxy-protocol=v2", "tcp", "127.0.0.1"),
        ("--proxy-protocol=v2", "tcp6", "::1"),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v2-tcp4", "v2-tcp6"],
)
def test_nginx_logs_the_true_client_address_and_port(
    workdir: Path, nginx_factory: NginxFactory, option: str, listener: str, client_host: str
) -> None:
    require_nginx()
    nginx = nginx_factory(proxy_protocol=True)
    with run_proxy(["-w", "2", option, f"127.0.0.1:{nginx.port}"], workdir, [listener]) as proxy:
        with proxy.connect() as client:
            client.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            response = read_to_eof(client)
            client_port = client.getsockname()[1]
        listen_host, listen_port = proxy.address()[:2]  # type: ignore[index]
        (entry,) = nginx.wait_for_access_log(1)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n"), response
    assert (entry.proxy_protocol_addr, entry.proxy_protocol_port) == (client_host, client_port)
    assert entry.proxy_protocol_peer == f"{client_host}:{client_port}"
    assert (entry.proxy_protocol_server_addr, entry.proxy_protocol_server_port) == (
        listen_host,
        listen_port,
    )
    assert entry.remote_addr == "127.0.0.1"  # nginx's real peer: forkproxy


@pytest.mark.parametrize("listener", ["tcp", "tcp6"])
def test_v2_header_every_field(workdir: Path, header_backend: HeaderBackend, listener: str) -> None:
    args = ["-w", "1", "--proxy-protocol=v2", header_backend.target]
    with run_proxy(args, workdir, [listener]) as proxy, proxy.connect() as client:
        client.sendall(b"hello\n")
        assert read_to_eof(client) == b"ok hello\n"
        client_host, client_port = client.getsockname()[:2]
        listen_host, listen_port = proxy.address()[:2]  # type: ignore[index]
    assert not header_backend.errors, header_backend.errors
    ((header, rest),) = header_backend.headers
    tcp6 = listener == "tcp6"
    assert header.version == 2
    assert header.command == "PROXY"
    assert header.family == ("INET6" if tcp6 else "INET")
    assert header.protocol == "STREAM"
    assert str(header.source_address) == client_host
    assert header.source_port == client_port
    assert str(header.destination_address) == listen_host
    assert header.destination_port == listen_port
    assert header.v2_version_command == 0x21
    assert header.v2_family_protocol == (0x21 if tcp6 else 0x11)
    assert header.v2_length == (36 if tcp6 else 12)
    assert header.header_length == 16 + header.v2_length
    assert header.tlvs == ()
    assert rest == b"hello\n"  # the client's bytes follow the header, none lost


@pytest.mark.parametrize(
    ("option", "command", "family", "length"),
    [("--proxy-protocol=v2", "LOCAL", "UNSPEC", 16), ("-p", "PROXY", "UNSPEC", 15)],
    ids=["v2-local", "v1-unknown"],
)
def test_unix_socket_client_gets_a_local_header(
    workdir: Path,
    header_backend: HeaderBackend,
    option: str,
    command: str,
    family: str,
    length: int,
) -> None:
    args = ["-w", "1", option, header_backend.target]
    with run_proxy(args, workdir, ["unix"]) as proxy, proxy.connect() as client:
        client.sendall(b"from unix\n")
        assert read_to_eof(client) == b"ok from unix\n"
    assert not header_backend.errors, header_backend.errors
    ((header, rest),) = header_backend.headers
    assert (header.command, header.family, header.header_length) == (command, family, length)
    assert (header.source_address, header.source_port) == (None, None)
    assert rest == b"from unix\n"


# -- timeouts -----------------------------------------------------------------------------


@pytest.fixture
def never_accepting() -> Iterator[str]:
    """A 127.0.0.1 listener whose backlog is full: the kernel drops new SYNs, so a
    connect() to it neither succeeds nor fails."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)  # room for one established connection
    filler = socket.create_connection(server.getsockname(), timeout=5)
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        filler.close()
        server.close()


def test_connect_timeout_closes_the_client_and_counts_an_error(
    workdir: Path, never_accepting: str
) -> None:
    timeout = 1.0
    metrics = _has_metrics()
    listeners, names = (("tcp", "tcp"), ("proxy", "metrics")) if metrics else (("tcp",), ())
    with run_proxy(
        ["-w", "2", f"--connect-timeout={timeout:g}s", never_accepting],
        workdir,
        listeners,
        names,
    ) as proxy:
        started = time.monotonic()  # before connecting: the proxy cannot start earlier
        with proxy.connect() as client:
            assert client.recv(1) == b""
            elapsed = time.monotonic() - started
        assert timeout <= elapsed <= 2 * timeout, elapsed
        if metrics:
            address = proxy.address(1)[:2]  # type: ignore[index]
            # The deprecated name, kept one release: the sum of the per-target counter.
            wait_until(
                lambda: _scrape(address)["forkproxy_backend_connect_errors_total"] == 1,
                10,
                "the connect error to be counted",
            )
            # Per target, by reason: one, a timeout.
            errors = {
                name: value
                for name, value in _scrape(address).items()
                if name.startswith("forkproxy_target_connect_errors_total{") and value
            }
            assert len(errors) == 1 and sum(errors.values()) == 1, errors
            assert 'reason="timeout"' in next(iter(errors))
        wait_until(lambda: "Connection timed out" in proxy.stderr(), 10, "the warning")
        assert f"cannot connect to target '{never_accepting}'" in proxy.stderr()


def test_idle_connection_is_closed_and_an_active_one_is_not(workdir: Path) -> None:
    timeout = 1.0
    with (
        run_backend("echo") as backend,
        run_proxy(["-w", "2", f"--idle-timeout={timeout:g}s", backend.target], workdir) as proxy,
    ):
        idle = proxy.connect()
        active = proxy.connect()
        idle_since = time.monotonic()  # before the last byte: the proxy sees it later
        for client in (idle, active):
            client.sendall(b"x")
            assert client.recv(1) == b"x"
        idle_closed_after = None
        next_byte = idle_since + timeout / 2
        end = idle_since + 3 * timeout
        while time.monotonic() < end:
            watch = [idle] if idle_closed_after is None else []
            wait = max(0.0, min(next_byte, end) - time.monotonic())
            readable, _, _ = select.select(watch, [], [], wait)
            if readable:
                with pytest.raises(ConnectionResetError):  # aborted: the stream is cut short
                    idle.recv(1)
                idle_closed_after = time.monotonic() - idle_since
            if time.monotonic() >= next_byte:  # a byte every half timeout
                active.sendall(b"a")
                assert active.recv(1) == b"a"
                next_byte += timeout / 2
        assert idle_closed_after is not None, "the idle connection was not closed"
        assert timeout <= idle_closed_after <= 2.5 * timeout, idle_closed_after
        assert send_all_then_read(active, b"still here") == b"still here"
        idle.close()
        active.close()


def test_an_idle_timeout_close_is_logged_at_debug_level_only(workdir: Path) -> None:
    """Why a quiet connection was cut is in the debug log, with the client; not above it."""
    for level in ("debug", "info"):
        with (
            run_backend("echo") as backend,
            run_proxy(
                ["-w", "1", "--idle-timeout=1s", f"--log-level={level}", backend.target], workdir
            ) as proxy,
        ):
            with proxy.connect() as client:
                client.sendall(b"x")
                assert client.recv(1) == b"x"
                with pytest.raises(ConnectionResetError):
                    client.recv(1)  # aborted by the idle timeout
                port = client.getsockname()[1]
            line = f"DEBUG worker 0: connection from 127.0.0.1:{port} ended: "
            if level == "debug":
                wait_until(lambda: line in proxy.stderr(), 10, "the debug line")  # noqa: B023
                assert "(--idle-timeout)" in proxy.stderr().split(line, 1)[1].splitlines()[0]
            assert proxy.stop() == 0
            if level == "info":
                assert "connection from" not in proxy.stderr()


# -- --on-limit=queue ---------------------------------------------------------------------


def test_queue_serves_every_client_in_turn_and_never_exceeds_the_cap(workdir: Path) -> None:
    with (
        CountingBackend() as backend,
        run_proxy(["-w", "2", "-c", "2", "--on-limit=queue", backend.target], workdir) as proxy,
    ):
        clients = [proxy.connect(timeout=10) for _ in range(6)]
        waiting = list(clients)
        served = 0
        while waiting:
            readable, _, _ = select.select(waiting, [], [], 10)
            assert readable, f"{len(waiting)} clients still waiting, none served"
            assert backend.current <= 2
            for client in readable:
                assert client.recv(1) == b"+"  # greeted by the backend: served
                served += 1
                waiting.remove(client)
                client.close()  # its turn is over: capacity for the next
        assert served == 6
        wait_until(lambda: backend.current == 0, 10, "the backend to see every close")
        assert (backend.total, backend.peak) == (6, 2)
        assert "refusing" not in proxy.stderr()


# -- per-source cap -----------------------------------------------------------------------


def test_per_source_cap_refuses_the_third_from_one_address_only(workdir: Path) -> None:
    with (
        CountingBackend() as backend,
        run_proxy(["-w", "2", "--max-connections-per-source=2", backend.target], workdir) as proxy,
    ):
        held = [_client_from("127.0.0.1", proxy) for _ in range(2)]
        assert [outcome(client) for client in held] == ["admitted", "admitted"]
        with _client_from("127.0.0.1", proxy) as third:
            assert outcome(third) == "refused"
        other = _client_from("127.0.0.2", proxy)
        assert outcome(other) == "admitted"  # another source still gets in
        assert backend.total == 3
        wait_until(lambda: "per source reached" in proxy.stderr(), 10, "the warning")
        held.pop().close()

        def admitted_again() -> bool:
            # The backend counts a connection gone before its close reaches the proxy,
            # which releases the unit only then: a client may still be refused meanwhile.
            with _client_from("127.0.0.1", proxy) as again:
                return outcome(again) == "admitted"

        wait_until(admitted_again, 10, "the closed one's unit to come back")
        # Every worker killed: the kernel returns their units, nothing leaks.
        old = proxy.workers()
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: len(proxy.workers()) == 2 and not set(proxy.workers()) & set(old),
            10,
            "replacement workers",
        )
        fresh = [_client_from("127.0.0.1", proxy) for _ in range(3)]
        assert [outcome(client) for client in fresh] == ["admitted", "admitted", "refused"]
        for client in [*held, other, *fresh]:
            client.close()


# -- routes and several targets -----------------------------------------------------------


def test_routes_by_fdname_under_systemd_socket_activate(workdir: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is missing")
    web_path, api_path = str(workdir / "web.sock"), str(workdir / "api.sock")
    with CountingBackend() as web, CountingBackend() as api, CountingBackend() as default:
        command = [activate, "-l", web_path, "-l", api_path, "--fdname=web:api"]
        command += [FORKPROXY, "-w", "2", f"--route=web={web.target}"]
        command += [f"--route=api={api.target}", default.target]
        with open(workdir / "activate.log", "wb") as log:
            process = subprocess.Popen(command, stderr=log, start_new_session=True)
        try:
            for path, backend in ((web_path, web), (api_path, api), (web_path, web)):
                client = _connect_unix_when_listening(path)
                with client:
                    assert outcome(client) == "admitted"
                wait_until(partial(_closed, backend), 10, "the close")
            assert (web.total, api.total, default.total) == (2, 1, 0)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _closed(backend: CountingBackend) -> bool:
    return backend.current == 0


def _connect_unix_when_listening(path: str) -> socket.socket:
    connected: list[socket.socket] = []

    def attempt() -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return False
        connected.append(sock)
        return True

    wait_until(attempt, 10, f"a listener on {path}")
    return connected[0]


def test_routes_by_listen_names(workdir: Path) -> None:
    web_path, api_path = str(workdir / "web.sock"), str(workdir / "api.sock")
    with CountingBackend() as web, CountingBackend() as api:
        argv = [FORKPROXY, "-w", "1", f"--listen=web={web_path}", f"--listen=api={api_path}"]
        argv += [f"--route=web={web.target}", f"--route=api={api.target}", api.target]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        with open(workdir / "forkproxy.log", "wb") as log:
            process = subprocess.Popen(argv, stderr=log, env=env, start_new_session=True)
        try:
            with _connect_unix_when_listening(web_path) as client:
                assert outcome(client) == "admitted"
            with _connect_unix_when_listening(api_path) as client:
                assert outcome(client) == "admitted"
            assert (web.total, api.total) == (1, 1)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_two_targets_one_down_every_connection_succeeds(workdir: Path) -> None:
    with (
        CountingBackend() as up,
        run_proxy(["-w", "2", _dead_target(), up.target], workdir) as proxy,
    ):
        for _ in range(10):
            with proxy.connect() as client:
                assert outcome(client) == "admitted"
        assert up.total == 10
        assert "trying the other targets" in proxy.stderr()
        assert "closing connection" not in proxy.stderr()  # no client failed


def test_two_targets_both_up_split_round_robin(workdir: Path) -> None:
    with (
        CountingBackend() as first,
        CountingBackend() as second,
        run_proxy(["-w", "1", first.target, second.target], workdir) as proxy,
    ):
        for _ in range(10):
            with proxy.connect() as client:
                assert outcome(client) == "admitted"
        assert (first.total, second.total) == (5, 5)  # one worker: strict alternation


def test_every_target_down_fails_the_client(workdir: Path) -> None:
    with run_proxy(["-w", "1", _dead_target(), _dead_target()], workdir) as proxy:
        with proxy.connect() as client:
            assert client.recv(1) == b""
        wait_until(lambda: "closing connection" in proxy.stderr(), 10, "the warning")


# -- socket options -----------------------------------------------------------------------


def test_keepalive_reaches_both_sides(workdir: Path) -> None:
    with (
        run_backend("echo") as backend,
        run_proxy(["-w", "1", "--keepalive=77s,9s,4", backend.target], workdir) as proxy,
        proxy.connect() as client,
    ):
        client.sendall(b"x")
        assert client.recv(1) == b"x"  # relayed: both of the worker's sockets exist
        (worker,) = proxy.workers()
        listen_port = proxy.address()[1]  # type: ignore[index]
        # ss shows the keep-alive timer of sockets with SO_KEEPALIVE: both of the worker's.
        result = subprocess.run(
            ["ss", "-tnoepH", "state", "established"], capture_output=True, text=True, check=True
        )
        mine = [line for line in result.stdout.splitlines() if f"pid={worker}," in line]
        assert len(mine) == 2, result.stdout
        assert all("timer:(keepalive," in line for line in mine), mine
        client_side = [line for line in mine if f":{listen_port} " in line]
        assert len(client_side) == 1, mine


def test_pipe_size_relays_large_payloads(workdir: Path) -> None:
    with (
        run_backend("echo") as backend,
        run_proxy(["-w", "1", "--pipe-size=1M", backend.target], workdir) as proxy,
        proxy.connect(timeout=30) as client,
    ):
        payload = os.urandom(8 << 20)
        assert send_all_then_read(client, payload) == payload


# -- VSOCK --------------------------------------------------------------------------------


def test_vsock_target_relays(workdir: Path) -> None:
    # Loopback (CID 1) needs the vsock_loopback transport; without it a connect to CID 1
    # is handed to the hypervisor's transport, so nothing is tried.
    if not os.path.isdir("/sys/module/vsock_loopback"):
        pytest.skip("AF_VSOCK loopback (the vsock_loopback module) is not loaded here")
    server = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    server.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
    server.listen()
    port = server.getsockname()[1]

    def echo_once() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=echo_once, daemon=True)
    thread.start()
    try:
        with run_proxy(["-w", "1", f"vsock:1:{port}"], workdir) as proxy, proxy.connect() as c:
            assert send_all_then_read(c, b"over vsock" * 1000) == b"over vsock" * 1000
    finally:
        server.close()
