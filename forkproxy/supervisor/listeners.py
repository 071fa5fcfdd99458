"""Listening sockets forkproxy binds itself from --listen addresses, and their cleanup.

Binds exactly what was asked (a bare PORT is dual-stack, as ListenStream= and
ListenDatagram= make it), of the socket type asked (stream, datagram, sequential
packet), and creates unix socket files with the requested mode from the start (no window
with a wider one). Removes at exit only the socket files it created.
"""

import contextlib
import errno
import os
import socket
import stat

from forkproxy.errors import ForkproxyError
from forkproxy.settings.address import ListenAddress, format_sockaddr
from forkproxy.settings.quoting import quote
from forkproxy.shared.listener import Listener

BACKLOG = 4096  # Backlog= default in systemd.socket(5): SOMAXCONN
# SO_RCVBUF of a datagram socket bound by --listen (the kernel doubles it, and caps the
# request at net.core.rmem_max): a few dozen full-size datagrams waiting for the worker.
DATAGRAM_RECEIVE_BUFFER = 4 << 20


def bind_listener(address: ListenAddress, socket_mode: int) -> Listener:
    """Bind and listen on `address`; ForkproxyError with the reason if that fails."""
    try:
        if address.family == socket.AF_UNIX:
            return _bind_unix(address, socket_mode)
        return _bind_inet(address)
    except OSError as error:
        raise ForkproxyError(
            f"cannot listen on {quote(address.text)}: {error.strerror or error}"
        ) from None


def close_listeners(listeners: list[Listener]) -> None:
    """Close our copies; unlink socket files we created (passed sockets stay systemd's)."""
    for listener in listeners:
        path = listener.unlink_path
        if path is not None:
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == listener.unlink_inode:
                    os.unlink(path)
        listener.sock.close()


def _bind_inet(address: ListenAddress) -> Listener:
    sockaddr = address.sockaddr
    family = address.family
    kind = address.kind
    try:
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
    except OSError as error:
        if not (address.dual_stack and error.errno == errno.EAFNOSUPPORT):
            raise
        # No IPv6 on this host: a bare PORT means IPv4 only, as systemd falls back.
        assert isinstance(sockaddr, tuple)
        family, sockaddr = socket.AF_INET, ("0.0.0.0", sockaddr[1])
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address.dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        if kind == socket.SOCK_DGRAM:
            _size_datagram_buffer(sock)
        else:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    where = format_sockaddr(family, sock.getsockname())
    if kind == socket.SOCK_DGRAM:
        where = "udp:" + where
    return Listener(sock, address.name, where, kind=kind)


def _size_datagram_buffer(sock: socket.socket) -> None:
    """A receive buffer for bursts of datagrams from many clients (ours to size, unlike a
    passed socket's, whose ReceiveBuffer= belongs to its .socket unit)."""
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < DATAGRAM_RECEIVE_BUFFER:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, DATAGRAM_RECEIVE_BUFFER)
        except OSError:
            pass  # the kernel caps it at net.core.rmem_max and says nothing


def _bind_unix(address: ListenAddress, socket_mode: int) -> Listener:
    path = address.sockaddr
    assert isinstance(path, str)
    abstract = path.startswith("\0")
    kind = address.kind
    if not abstract:
        _remove_stale_socket(path, kind)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        # The umask decides the mode bind() creates the file with: no chmod() race.
        old_umask = os.umask(0o777 & ~socket_mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        if not abstract:
            os.chmod(path, socket_mode)  # the umask cannot add bits a parent umask removed
        if kind != socket.SOCK_DGRAM:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    label = _KIND_PREFIX.get(kind, "") + format_sockaddr(socket.AF_UNIX, path)
    if abstract:
        return Listener(sock, address.name, label, kind=kind)
    return Listener(sock, address.name, label, path, os.lstat(path).st_ino, kind)


_KIND_PREFIX: dict[int, str] = {
    socket.SOCK_DGRAM: "unix-dgram:",
    socket.SOCK_SEQPACKET: "seqpacket:",
}


def _remove_stale_socket(path: str, kind: int = socket.SOCK_STREAM) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ForkproxyError(f"cannot listen on {quote(path)}: it exists and is not a socket")
    # A probe of the socket's own type: connect(2) to a socket of another type fails with
    # EPROTOTYPE whether or not anyone is bound there.
    probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # left behind by a process that is gone
        return
    except OSError:
        return  # let bind() report what is wrong
    finally:
        probe.close()
    raise ForkproxyError(f"cannot listen on {quote(path)}: another process is listening there")
