"""--accept-proxy with the installed forkproxy: carried addresses in the access log, in the
header sent on and in the per-source limit; bytes after the header relayed; untrusted,
malformed, truncated, byte-a-time, slow and oversized headers; and the chain a real
HAProxy (send-proxy-v2) -> forkproxy --accept-proxy -pv1 -> a real nginx (proxy_protocol)."""

import contextlib
import errno
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkproxy.relay.proxy_protocol import encode_v1, encode_v2
from tests.support import nginx as nginx_support
from tests.support.access_log import wait_for_lines
from tests.support.nginx import NginxFactory
from tests.support.proxy import (
    Proxy,
    free_port,
    run_backend,
    run_proxy,
    send_all_then_read,
    wait_until,
)
from tests.support.proxy_protocol_decoder import read_header
from tests.support.supervision import get

nginx_factory = nginx_support.nginx_factory  # the fixture, used by name below

LISTENERS = (("tcp", "tcp"), ("web", "metrics"))
CLIENT = ("198.51.100.7", 51334)  # documentation addresses: only ever in headers
SERVER = ("203.0.113.9", 443)
V1 = encode_v1(CLIENT, SERVER, socket.AF_INET)
V2 = encode_v2(CLIENT, SERVER, socket.AF_INET)


def text(address: object) -> str:
    """host:port of an AF_INET socket address."""
    assert isinstance(address, tuple)
    return f"{address[0]}:{address[1]}"


def header_errors(proxy: Proxy) -> dict[str, float]:
    status, body = get(proxy, "/metrics")
    assert status == 200
    errors = {}
    for line in body.splitlines():
        if line.startswith("forkproxy_proxy_header_errors_total{"):
            labels, value = line.rsplit(" ", 1)
            errors[labels.split('"')[1]] = float(value)
    return errors


@contextlib.contextmanager
def accepting_proxy(workdir: Path, target: str, *args: str) -> Iterator[tuple[Proxy, Path]]:
    log = workdir / "access.log"
    with run_proxy(
        [
            "-w",
            "2",
            "--accept-proxy",
            f"--access-log={log}",
            "--access-log-format=json",
            *args,
            target,
        ],
        workdir,
        *LISTENERS,
    ) as proxy:
        yield proxy, log


@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
def test_the_carried_address_is_logged_and_sent_on_and_bytes_after_it_relayed(
    workdir: Path, header: bytes
) -> None:
    target = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{target.getsockname()[1]}"
    with target, accepting_proxy(workdir, address, "-pv2") as (proxy, log):
        with proxy.connect() as client:
            client.sendall(header + b"hello")  # one segment: header and data
            conn, _ = target.accept()
            with conn:
                sent_on, data = read_header(conn)
                assert (str(sent_on.source_address), sent_on.source_port) == CLIENT
                assert (str(sent_on.destination_address), sent_on.destination_port) == SERVER
                while len(data) < 5:
                    data += conn.recv(5 - len(data))
                assert data == b"hello"
                conn.sendall(b"world!")
            assert client.recv(6) == b"world!"
        (line,) = wait_for_lines(log, 1)
    assert line["client"] == "198.51.100.7:51334"
    assert (line["bytes_from_client"], line["bytes_to_client"]) == (5, 6)


def test_a_header_one_byte_at_a_time(workdir: Path) -> None:
    with run_backend("echo") as backend, accepting_proxy(workdir, backend.target) as (proxy, log):
        with proxy.connect() as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for byte in V2:
                client.send(bytes([byte]))
                time.sleep(0.001)  # separate segments, not a wait for anything
            assert send_all_then_read(client, b"data") == b"data"
        (line,) = wait_for_lines(log, 1)
    assert (line["client"], line["end"], line["bytes_from_client"]) == (
        "198.51.100.7:51334",
        "client-closed",
        4,
    )


def test_v2_local_keeps_the_connection_address(workdir: Path) -> None:
    local = encode_v2(None, None, socket.AF_UNIX)  # LOCAL, as a balancer's health check
    with run_backend("echo") as backend, accepting_proxy(workdir, backend.target) as (proxy, log):
        with proxy.connect() as client:
            assert send_all_then_read(client, local + b"ok") == b"ok"
            own = text(client.getsockname())
        (line,) = wait_for_lines(log, 1)
    assert line["client"] == own


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", "bad-signature"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bad-v1-syntax"),
        (b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n", "bad-address"),
        (b"PROXY " + b"A" * 120, "too-long"),
        (V2[:12] + b"\x21\x11\xff\xff", "too-long"),  # a v2 length far past the limit
        (V2[:12] + b"\x31", "bad-version"),
        (V1[:20], "truncated"),  # then EOF
    ],
    ids=["http", "lone-lf", "address", "long-v1", "long-v2", "version", "truncated"],
)
def test_bad_headers_close_without_a_target(workdir: Path, sent: bytes, reason: str) -> None:
    with run_backend("greet") as backend, accepting_proxy(workdir, backend.target) as (proxy, log):
        with proxy.connect() as client, contextlib.suppress(ConnectionResetError):
            client.sendall(sent)
            try:
                client.shutdown(socket.SHUT_WR)
            except OSError as error:  # the proxy's reset came first: the socket is gone
                assert error.errno == errno.ENOTCONN
            else:
                assert client.recv(10) == b""  # no "+": no target was contacted
        (line,) = wait_for_lines(log, 1)
        assert (line["end"], line["target"], line["connect_ms"]) == (
            "proxy-header-error",
            "",
            None,
        )
        wait_until(lambda: header_errors(proxy).get(reason) == 1, 10, f"{reason} counted")


def test_a_header_too_slow_times_out(workdir: Path) -> None:
    with (
        run_backend("greet") as backend,
        accepting_proxy(workdir, backend.target, "--accept-proxy-timeout=0.3s") as (proxy, log),
    ):
        with proxy.connect() as client, contextlib.suppress(ConnectionResetError):
            client.sendall(V1[:10])  # and nothing more
            assert client.recv(10) == b""
        (line,) = wait_for_lines(log, 1)
        assert line["end"] == "proxy-header-error"
        assert header_errors(proxy)["timeout"] == 1


def test_untrusted_peers_are_rejected_or_relayed_as_they_are(workdir: Path) -> None:
    with run_backend("echo") as backend:
        with accepting_proxy(workdir, backend.target, "--accept-proxy-from=10.0.0.0/8") as (
            proxy,
            log,
        ):
            with proxy.connect() as client, contextlib.suppress(ConnectionResetError):
                client.sendall(V1 + b"x")
                assert client.recv(10) == b""
            (line,) = wait_for_lines(log, 1)
            assert line["end"] == "proxy-header-error"
            assert header_errors(proxy)["untrusted"] == 1
        log.unlink()
        with accepting_proxy(
            workdir,
            backend.target,
            "--accept-proxy-from=10.0.0.0/8",
            "--accept-proxy-untrusted=direct",
        ) as (proxy, log):
            with proxy.connect() as client:
                # Not trusted: the header is the client's data, relayed as it is.
                assert send_all_then_read(client, V1 + b"x") == V1 + b"x"
                own = text(client.getsockname())
            (line,) = wait_for_lines(log, 1)
            assert (line["client"], line["bytes_from_client"]) == (own, len(V1) + 1)
        log.unlink()
        with accepting_proxy(workdir, backend.target, "--accept-proxy-from=127.0.0.0/8") as (
            proxy,
            log,
        ):
            with proxy.connect() as client:
                assert send_all_then_read(client, V1 + b"x") == b"x"
            (line,) = wait_for_lines(log, 1)
            assert line["client"] == "198.51.100.7:51334"


def test_the_per_source_limit_counts_carried_addresses(workdir: Path) -> None:
    """Two clients behind one balancer each get their own quota of one."""
    first = encode_v1(("198.51.100.1", 1000), SERVER, socket.AF_INET)
    second = encode_v1(("198.51.100.2", 1000), SERVER, socket.AF_INET)
    again = encode_v1(("198.51.100.1", 2000), SERVER, socket.AF_INET)
    with (
        run_backend("greet") as backend,
        accepting_proxy(workdir, backend.target, "--connections-max-per-source=1") as (proxy, log),
    ):
        with proxy.connect() as one, proxy.connect() as two:
            one.sendall(first)
            two.sendall(second)
            assert one.recv(1) == b"+" and two.recv(1) == b"+"
            with proxy.connect() as three, contextlib.suppress(ConnectionResetError):
                three.sendall(again)
                assert three.recv(1) == b""
            (line,) = wait_for_lines(log, 1)
            assert (line["end"], line["client"]) == ("refused-per-source", "198.51.100.1:2000")
        lines = wait_for_lines(log, 3)
    assert sorted(str(line["client"]) for line in lines[1:]) == [
        "198.51.100.1:1000",
        "198.51.100.2:1000",
    ]


@pytest.mark.timeout(60)
def test_haproxy_to_forkproxy_to_nginx_keeps_the_client_address(
    workdir: Path, nginx_factory: NginxFactory
) -> None:
    """A real HAProxy (send-proxy-v2) in front of forkproxy --accept-proxy -pv1, relaying to
    a real nginx reading the header: nginx and forkproxy's log see the original client."""
    nginx_support.require_nginx()
    nginx = nginx_factory("127.0.0.1:0", proxy_protocol=True, body=b"behind two proxies\n")
    log = workdir / "access.log"
    with (
        run_proxy(
            ["--accept-proxy", "-pv1", f"--access-log={log}", f"127.0.0.1:{nginx.port}"],
            workdir,
            names=("web",),
        ) as proxy,
        haproxy(workdir, text(proxy.address())) as front,
    ):
        with socket.socket() as client:
            client.settimeout(10)
            client.bind(("127.0.0.2", 0))  # an address none of the proxies has
            client.connect(front)
            client.sendall(b"GET /chain HTTP/1.0\r\n\r\n")
            response = b""
            while chunk := client.recv(4096):
                response += chunk
            source_port = client.getsockname()[1]
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"behind two proxies\n")
        (entry,) = nginx.wait_for_access_log(1)
        assert (entry.proxy_protocol_addr, entry.proxy_protocol_port) == (
            "127.0.0.2",
            source_port,
        )
        wait_until(lambda: log.exists() and "end=" in log.read_text(), 10, "forkproxy's line")
        assert f"client=127.0.0.2:{source_port} " in log.read_text()


@contextlib.contextmanager
def haproxy(workdir: Path, target: str) -> Iterator[tuple[str, int]]:
    """A real HAProxy on a listening socket we made (fd@), sending send-proxy-v2 on."""
    listener = socket.create_server(("127.0.0.1", 0))
    config = workdir / "haproxy.cfg"
    config.write_text(
        "global\n    maxconn 100\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        "listen front\n"
        f"    bind fd@{listener.fileno()}\n"
        f"    server forkproxy {target} send-proxy-v2\n"
    )
    process = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)],
        pass_fds=[listener.fileno()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield listener.getsockname()
    finally:
        process.kill()
        process.wait(10)
        if process.stderr is not None:
            process.stderr.close()
        listener.close()


@pytest.mark.timeout(60)
def test_nginx_stream_with_proxy_protocol_in_front(workdir: Path) -> None:
    """A real nginx stream proxy with `proxy_protocol on;` (v1) in front of forkproxy
    --accept-proxy: forkproxy's log sees the client nginx saw."""
    nginx_support.require_nginx(stream=True)
    with (
        run_backend("echo") as backend,
        accepting_proxy(workdir, backend.target) as (proxy, log),
        nginx_stream_front(workdir, text(proxy.address())) as front,
    ):
        with socket.socket() as client:
            client.settimeout(10)
            client.bind(("127.0.0.3", 0))
            client.connect(front)
            assert send_all_then_read(client, b"through nginx") == b"through nginx"
            source = text(client.getsockname())
        (line,) = wait_for_lines(log, 1)
    assert (line["client"], line["bytes_from_client"]) == (source, len(b"through nginx"))


@contextlib.contextmanager
def nginx_stream_front(workdir: Path, target: str) -> Iterator[tuple[str, int]]:
    """nginx's stream module relaying 127.0.0.1:PORT to `target` with a v1 header first."""
    directory = workdir / "nginx-front"
    directory.mkdir()
    port = free_port()  # nginx binds by number; a clash fails the readiness wait below
    config = directory / "nginx.conf"
    config.write_text(
        f"load_module {nginx_support.NGINX_MODULES / 'ngx_stream_module.so'};\n"
        "daemon off;\nmaster_process off;\nworker_processes 1;\n"
        f"pid {directory / 'nginx.pid'};\nerror_log {directory / 'error.log'} info;\n"
        "events { worker_connections 64; }\n"
        "stream {\n    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        f"        proxy_pass {target};\n"
        "        proxy_protocol on;\n"
        "        proxy_half_close on;\n"
        "    }\n}\n"
    )
    process = subprocess.Popen(
        [str(nginx_support.NGINX_BINARY), "-p", f"{directory}/", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: (directory / "nginx.pid").exists(), 10, "nginx's pid file")
        yield ("127.0.0.1", port)
    finally:
        process.kill()
        process.wait(10)
