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


def test_refuses_a_datagram_socket() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(ForkproxyError, match="is not a listening stream socket"):
        adopt_listener(sock.fileno(), "unknown")
    sock.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
