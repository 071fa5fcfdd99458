"""Listening sockets forkproxy binds itself from --listen addresses, and their cleanup.

Binds exactly what was asked (a bare PORT is dual-stack, as ListenStream= makes it) and
creates unix socket files with the requested mode from the start (no window with a
wider one). Removes at exit only the socket files it created.
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
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as error:
        if not (address.dual_stack and error.errno == errno.EAFNOSUPPORT):
            raise
        # No IPv6 on this host: a bare PORT means IPv4 only, as systemd falls back.
        assert isinstance(sockaddr, tuple)
        family, sockaddr = socket.AF_INET, ("0.0.0.0", sockaddr[1])
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address.dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    where = format_sockaddr(family, sock.getsockname())
    return Listener(sock, address.name, f"{where}")


def _bind_unix(address: ListenAddress, socket_mode: int) -> Listener:
    path = address.sockaddr
    assert isinstance(path, str)
    abstract = path.startswith("\0")
    if not abstract:
        _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # The umask decides the mode bind() creates the file with: no chmod() race.
        old_umask = os.umask(0o777 & ~socket_mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        if not abstract:
            os.chmod(path, socket_mode)  # the umask cannot add bits a parent umask removed
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    label = format_sockaddr(socket.AF_UNIX, path)
    if abstract:
        return Listener(sock, address.name, label)
    return Listener(sock, address.name, label, path, os.lstat(path).st_ino)


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ForkproxyError(f"cannot listen on {quote(path)}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
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
