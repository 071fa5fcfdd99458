"""sd_listen_fds(3): which fds are ours, their names, and what we refuse."""

import fcntl
import os
import socket
import struct

import pytest

from forkproxy.errors import ForkproxyError
from forkproxy.shared.listener import is_connection
from forkproxy.supervisor.activation import adopt_listener, passed_fds
from tests.support.proxy import wait_until


def test_not_for_us_or_unset() -> None:
    assert passed_fds({}) == []
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "2"}
    assert passed_fds(environ) == []
    assert environ == {}  # the variables are removed either way


def test_names_and_cloexec() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    saved = os.dup(3) if _is_open(3) else None
    try:
        os.dup2(listener.fileno(), 3, inheritable=True)
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
        assert passed_fds(environ) == [(3, "web")]
        assert fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        adopted = adopt_listener(3, "web")
        assert adopted.fd == 3  # the same fd, not a dup
        assert adopted.name == "web" and "127.0.0.1" in adopted.label
        assert adopted.sock.getblocking() is False
        adopted.sock.detach()
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        else:
            os.close(3)
        listener.close()


def test_mismatched_names_fall_back_to_unknown() -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": "a:b"}
    assert passed_fds(environ) == []


def test_bad_variables() -> None:
    with pytest.raises(ForkproxyError, match="invalid"):
        passed_fds({"LISTEN_PID": "x", "LISTEN_FDS": "1"})


def test_refuses_a_connected_socket() -> None:
    left, right = socket.socketpair()
    with pytest.raises(ForkproxyError, match="is not a listening stream socket"):
        adopt_listener(left.fileno(), "unknown")
    left.close()  # still open: refusing did not close it
    right.close()


def test_a_bound_socket_is_neither_a_listener_nor_a_connection() -> None:
    """listen() never called: not Accept=yes's connection, and refused as a listener."""
    bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bound.bind(("127.0.0.1", 0))
    assert not is_connection(bound.fileno())
    with pytest.raises(ForkproxyError) as raised:
        adopt_listener(bound.fileno(), "unknown")
    assert str(raised.value) == (
        f"fd {bound.fileno()} from systemd is not a listening stream socket: listen() was "
        "not called on it, and it is not a connection either"
    )
    bound.close()  # still open: refusing did not close it


def test_what_accept_yes_passes_is_a_connection() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    connection, _ = listener.accept()
    with listener, client, connection:
        assert is_connection(connection.fileno())
        assert not is_connection(listener.fileno())
        # A client that reset before forkproxy looked is still the connection passed.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        wait_until(lambda: _peer_gone(connection), 10, "the reset to arrive")
        assert is_connection(connection.fileno())


def _peer_gone(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return True
    return False


@pytest.mark.parametrize(
    ("make", "kind", "label"),
    [
        (
            lambda d: _bound(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0)),
            2,
            "udp:127.0.0.1:",
        ),
        (lambda d: _bound(socket.AF_INET6, socket.SOCK_DGRAM, ("::1", 0)), 2, "udp:[::1]:"),
        (lambda d: _bound(socket.AF_UNIX, socket.SOCK_DGRAM, f"{d}/d.sock"), 2, "unix-dgram:/"),
        (lambda d: _listening(socket.SOCK_SEQPACKET, f"{d}/s.sock"), 5, "seqpacket:/"),
    ],
    ids=["udp", "udp6", "unix-dgram", "seqpacket"],
)
def test_adopts_datagram_and_sequential_packet_sockets(tmp_path, make, kind, label) -> None:
    """ListenDatagram= and ListenSequentialPacket= pass these: bound, or listening."""
    sock = make(tmp_path)
    with sock:
        adopted = adopt_listener(sock.fileno(), "dns")
        assert adopted.kind == kind
        assert adopted.is_datagram == (kind == socket.SOCK_DGRAM)
        assert adopted.label.startswith(f"fd {sock.fileno()} 'dns' ({label}")
        assert adopted.sock.getblocking() is False
        adopted.sock.detach()


def _bound(family: int, kind: int, address: object) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.bind(address)
    return sock


def _listening(kind: int, path: str) -> socket.socket:
    sock = _bound(socket.AF_UNIX, kind, path)
    sock.listen()
    return sock


def test_refuses_a_sequential_packet_connection() -> None:
    """Accept=yes with ListenSequentialPacket= passes a connection: not relayed."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        assert not is_connection(left.fileno())
        with pytest.raises(ForkproxyError) as raised:
            adopt_listener(left.fileno(), "unknown")
        assert str(raised.value) == (
            f"fd {left.fileno()} from systemd is a sequential-packet connection (Accept=yes): "
            "forkproxy relays sequential-packet sockets with Accept=no only"
        )


def test_refuses_a_sequential_packet_socket_not_listening(tmp_path) -> None:
    with _bound(socket.AF_UNIX, socket.SOCK_SEQPACKET, f"{tmp_path}/s.sock") as sock:
        with pytest.raises(ForkproxyError) as raised:
            adopt_listener(sock.fileno(), "unknown")
        assert str(raised.value) == (
            f"fd {sock.fileno()} from systemd is not a listening sequential-packet socket: "
            "listen() was not called on it"
        )


def test_refuses_a_datagram_socket_neither_udp_nor_unix() -> None:
    udplite = getattr(socket, "IPPROTO_UDPLITE", 136)  # udplite(7): SOCK_DGRAM, not UDP
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, udplite)
    except OSError:
        pytest.skip("no UDP-Lite in this kernel")
    fd = sock.fileno()
    with sock, pytest.raises(ForkproxyError) as raised:
        adopt_listener(fd, "unknown")
    assert str(raised.value) == (
        f"fd {fd} from systemd is a datagram socket neither UDP nor unix "
        f"(family 2, protocol {udplite})"
    )


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
