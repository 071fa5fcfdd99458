"""The real-nginx test backend works: it serves, it stops, and with ``proxy_protocol`` it
logs the client address and port that a PROXY header (from forkproxy's encoder) carried.

The header checks here are --proxy-protocol's end-to-end check done by hand: the same
headers, sent on a raw socket instead of by forkproxy.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forkproxy.relay.proxy_protocol import encode_v1, encode_v2
from tests.support import nginx as nginx_support
from tests.support.nginx import Nginx, NginxError, NginxFactory, run_nginx

nginx_factory = nginx_support.nginx_factory  # the fixture, used by name below

Encoder = Callable[[Any, Any, int], bytes]

LISTENS = ["127.0.0.1:0", "[::1]:0", "unix:"]
ENCODERS = [pytest.param(encode_v1, id="v1"), pytest.param(encode_v2, id="v2")]
# documentation addresses (RFC 5737, RFC 3849): only ever written into headers
HEADER_ENDS = [
    pytest.param(socket.AF_INET, ("198.51.100.7", 51334), ("203.0.113.9", 443), id="tcp4"),
    pytest.param(
        socket.AF_INET6, ("2001:db8::7", 51335, 0, 0), ("2001:db8::9", 8443, 0, 0), id="tcp6"
    ),
]


@pytest.fixture(autouse=True)
def _nginx_installed() -> None:
    nginx_support.require_nginx()


def _socket_peer(nginx: Nginx, sock: socket.socket) -> tuple[str, int | None]:
    """What nginx should log as $remote_addr/$remote_port for a connection from sock."""
    if nginx.family == socket.AF_UNIX:
        return "unix:", None
    host, port = sock.getsockname()[:2]
    return host, port


@pytest.mark.parametrize("listen", LISTENS)
def test_get_returns_body(nginx_factory: NginxFactory, listen: str) -> None:
    nginx = nginx_factory(listen, body=b"fixed body\n")
    response = nginx.get("/any/path")
    assert (response.status, response.body) == (200, b"fixed body\n")
    (entry,) = nginx.wait_for_access_log(1)
    assert (entry.request, entry.status, entry.proxy_protocol_addr) == (
        "GET /any/path HTTP/1.0",
        200,
        None,
    )


def test_files_from_directory(nginx_factory: NginxFactory, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"file a\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "big.bin").write_bytes(bytes(range(256)) * 4096)
    nginx = nginx_factory(root=tmp_path)
    assert nginx.get("/a.txt").body == b"file a\n"
    assert nginx.get("/sub/big.bin").body == bytes(range(256)) * 4096
    assert nginx.get("/missing").status == 404


@pytest.mark.parametrize(("family", "client", "local"), HEADER_ENDS)
@pytest.mark.parametrize("encode", ENCODERS)
@pytest.mark.parametrize("listen", LISTENS)
def test_proxy_protocol_header_address_is_logged(
    nginx_factory: NginxFactory,
    listen: str,
    encode: Encoder,
    family: int,
    client: Any,
    local: Any,
) -> None:
    nginx = nginx_factory(listen, proxy_protocol=True)
    with nginx.connect() as sock:
        sock.sendall(encode(client, local, family) + b"GET / HTTP/1.0\r\n\r\n")
        response = nginx_support.read_to_eof(sock)
        remote = _socket_peer(nginx, sock)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    (entry,) = nginx.wait_for_access_log(1)
    assert (entry.proxy_protocol_addr, entry.proxy_protocol_port) == (client[0], client[1])
    assert entry.proxy_protocol_peer == f"{client[0]}:{client[1]}"
    assert (entry.proxy_protocol_server_addr, entry.proxy_protocol_server_port) == (
        local[0],
        local[1],
    )
    assert (entry.remote_addr, entry.remote_port) == remote


@pytest.mark.parametrize("encode", ENCODERS)
@pytest.mark.parametrize(
    ("family", "host", "connect_host", "expected_host"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::1", "::1", "::1"),
        (socket.AF_INET6, "::", "127.0.0.1", "127.0.0.1"),  # dual-stack: sent as TCP4
    ],
    ids=["ipv4", "ipv6", "dual-stack-ipv4-client"],
)
def test_relayed_client_port_is_logged(
    nginx_factory: NginxFactory,
    encode: Encoder,
    family: int,
    host: str,
    connect_host: str,
    expected_host: str,
) -> None:
    """What forkproxy will do: accept a real client, connect to nginx, send the header
    made from the accepted socket's ends. nginx must log the client's own port."""
    nginx = nginx_factory(proxy_protocol=True)
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((host, 0))
        listener.listen()
        listen_port = listener.getsockname()[1]
        with socket.create_connection((connect_host, listen_port), timeout=5) as client:
            accepted, _ = listener.accept()
            with accepted:
                header = encode(accepted.getpeername(), accepted.getsockname(), accepted.family)
            response = nginx.get(prefix=header)
            client_port = client.getsockname()[1]
    assert response.status == 200
    (entry,) = nginx.wait_for_access_log(1)
    assert (entry.proxy_protocol_addr, entry.proxy_protocol_port) == (expected_host, client_port)
    assert entry.proxy_protocol_server_port == listen_port


@pytest.mark.parametrize(
    ("encode", "header"),
    [(encode_v1, b"PROXY UNKNOWN\r\n"), (encode_v2, b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")],
    ids=["v1-unknown", "v2-local"],
)
def test_unix_client_header_is_accepted_without_address(
    nginx_factory: NginxFactory, encode: Encoder, header: bytes
) -> None:
    """A unix-socket client: nginx takes UNKNOWN and LOCAL and falls back to the real
    connection, so $proxy_protocol_addr is empty and $remote_addr is the socket peer."""
    sent = encode("", "/run/forkproxy.sock", socket.AF_UNIX)
    assert sent == header
    nginx = nginx_factory(proxy_protocol=True)
    with nginx.connect() as sock:
        sock.sendall(sent + b"GET / HTTP/1.0\r\n\r\n")
        response = nginx_support.read_to_eof(sock)
        remote = sock.getsockname()
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    (entry,) = nginx.wait_for_access_log(1)
    assert (entry.proxy_protocol_addr, entry.proxy_protocol_port) == (None, None)
    assert (entry.remote_addr, entry.remote_port) == remote


def test_proxy_protocol_listener_rejects_plain_request(nginx_factory: NginxFactory) -> None:
    nginx = nginx_factory(proxy_protocol=True)
    assert nginx.exchange(b"GET / HTTP/1.0\r\n\r\n") == b""
    assert nginx.access_log_entries() == []
    assert "broken header" in nginx.error_log_text()


@pytest.mark.parametrize("listen", LISTENS)
def test_stream_mode_logs_header_address(nginx_factory: NginxFactory, listen: str) -> None:
    nginx = nginx_factory(listen, mode="stream", proxy_protocol=True, body=b"stream says hi\n")
    header = encode_v2(("198.51.100.7", 51334), ("203.0.113.9", 443), socket.AF_INET)
    assert nginx.exchange(header) == b"stream says hi\n"
    (entry,) = nginx.wait_for_access_log(1)
    assert (entry.proxy_protocol_addr, entry.proxy_protocol_port, entry.request) == (
        "198.51.100.7",
        51334,
        None,
    )


def test_factory_runs_several_and_stops_all(nginx_factory: NginxFactory) -> None:
    first = nginx_factory(body=b"one")
    second = nginx_factory("[::1]:0", body=b"two")
    assert first.port != second.port
    assert (first.get().body, second.get().body) == (b"one", b"two")
    nginx_factory.close()
    assert first.process.poll() is not None
    assert second.process.poll() is not None
    assert not first.directory.exists()


def test_context_manager_stops_and_cleans_up(tmp_path: Path) -> None:
    socket_path = tmp_path / "nginx.sock"
    with run_nginx(f"unix:{socket_path}") as nginx:
        assert nginx.address == str(socket_path)
        assert nginx.get().status == 200
        pid_file = nginx.directory / "nginx.pid"
        assert int(pid_file.read_text()) == nginx.pid
    assert nginx.process.returncode == 0  # SIGTERM: a clean, fast shutdown
    assert not nginx.directory.exists()
    assert not socket_path.exists()


def test_startup_failure_reports_the_error_log() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (
            pytest.raises(NginxError, match=f"cannot listen on '127.0.0.1:{port}'"),
            run_nginx(f"127.0.0.1:{port}", startup_timeout=10),
        ):
            pass


def test_port_taken_after_probe_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """The free-port race: another process binds the port between the probe and nginx."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        real_free_port = nginx_support._free_port
        ports = iter([taken_port])
        monkeypatch.setattr(
            nginx_support, "_free_port", lambda *args: next(ports, None) or real_free_port(*args)
        )
        with run_nginx("127.0.0.1:0") as nginx:
            assert nginx.port != taken_port
            assert nginx.get().status == 200


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"listen": "localhost:80"}, "numeric address"),
        ({"listen": "unix:relative"}, "must be absolute"),
        ({"mode": "stream", "body": b"$remote_addr"}, "cannot hold"),
        ({"root": Path('/tmp/a"b')}, "cannot put"),
    ],
)
def test_bad_arguments_are_refused_before_starting(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message), run_nginx(**kwargs):
        pass
