"""Sockets passed by systemd (sd_listen_fds(3)) to verified `Listener`s.

Honours $LISTEN_PID, $LISTEN_FDS and $LISTEN_FDNAMES, adopts each fd from 3 as a socket
on the same fd number (no dup), marks it close-on-exec and removes the variables so
they cannot leak into anything started later. Never binds, re-listens, shuts down or
unlinks a passed socket, and leaves alone the options its .socket unit owns.
"""

import fcntl
import os
import socket

from forkproxy.errors import ForkproxyError
from forkproxy.settings.address import format_sockaddr
from forkproxy.settings.quoting import quote
from forkproxy.shared.listener import Listener

INETD_FD = 0  # --inetd, StandardInput=socket: the socket is standard input
# FileDescriptorName= of a passed socket that serves metrics instead of being proxied.
METRICS_FD_NAME = "metrics"

SD_LISTEN_FDS_START = 3
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def passed_fds(environ: dict[str, str] | os._Environ[str] = os.environ) -> list[tuple[int, str]]:
    """The (fd, name) pairs systemd passed us, or [] if none were meant for this process."""
    pid_text = environ.get("LISTEN_PID")
    count_text = environ.get("LISTEN_FDS")
    names_text = environ.get("LISTEN_FDNAMES")
    for variable in _VARIABLES:
        environ.pop(variable, None)
    if not pid_text or count_text is None:
        return []
    try:
        pid = int(pid_text)
        count = int(count_text)
    except ValueError:
        raise ForkproxyError(
            "invalid $LISTEN_PID/$LISTEN_FDS from the service manager: "
            f"{quote(pid_text)}, {quote(count_text)}"
        ) from None
    if pid != os.getpid():
        return []
    if count < 0:
        raise ForkproxyError(f"invalid $LISTEN_FDS from the service manager: {quote(count_text)}")
    names = names_text.split(":") if names_text is not None else []
    if len(names) != count:
        names = ["unknown"] * count
    fds = []
    for offset, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + offset
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as error:
            raise ForkproxyError(f"fd {fd} from systemd is not usable: {error.strerror}") from None
        fds.append((fd, name))
    return fds


def adopt_listener(fd: int, name: str) -> Listener:
    """The passed `fd` as a non-blocking listener: a listening stream or sequential-packet
    socket (ListenStream=, ListenSequentialPacket=) or a bound UDP or unix datagram socket
    (ListenDatagram=); ForkproxyError if it is none of them."""
    what = "standard input (--inetd)" if fd == 0 else f"fd {fd} from systemd"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        raise ForkproxyError(f"{what} is not a socket: {error.strerror}") from None
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        protocol = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as error:
        sock.detach()
        raise ForkproxyError(f"{what} cannot be inspected: {error.strerror}") from None
    problem = _listener_problem(sock, kind, protocol, listening)
    if problem is not None:
        sock.detach()  # not ours to close
        raise ForkproxyError(f"{what} {problem}")
    sock.setblocking(False)
    try:
        where = format_sockaddr(sock.family, sock.getsockname())
    except OSError:
        where = "?"
    if kind == socket.SOCK_DGRAM:
        where = ("udp:" if sock.family in _IP_FAMILIES else "unix-dgram:") + where
    elif kind == socket.SOCK_SEQPACKET:
        where = "seqpacket:" + where
    label = f"fd {fd} ({where})" if name in ("", "unknown") else f"fd {fd} '{name}' ({where})"
    return Listener(sock, "" if name == "unknown" else name, label, kind=kind)


def _listener_problem(sock: socket.socket, kind: int, protocol: int, listening: int) -> str | None:
    """What makes a passed socket no listener we serve, or None."""
    family = sock.family
    if kind == socket.SOCK_DGRAM:
        # ListenDatagram= gives UDP (SO_PROTOCOL IPPROTO_UDP) or unix datagram sockets;
        # a UDP-Lite or ICMP datagram socket is none of them.
        if family == socket.AF_UNIX or (family in _IP_FAMILIES and protocol == socket.IPPROTO_UDP):
            return None
        return f"is a datagram socket neither UDP nor unix (family {family}, protocol {protocol})"
    if kind == socket.SOCK_SEQPACKET:
        if family != socket.AF_UNIX:
            return f"is a sequential-packet socket of family {family}, not a unix one"
        if listening:
            return None
        if _has_peer(sock):
            return (
                "is a sequential-packet connection (Accept=yes): forkproxy relays "
                "sequential-packet sockets with Accept=no only"
            )
        return "is not a listening sequential-packet socket: listen() was not called on it"
    if kind != socket.SOCK_STREAM or not listening:
        why = ""
        if kind == socket.SOCK_STREAM and not _has_peer(sock):
            why = ": listen() was not called on it, and it is not a connection either"
        return f"is not a listening stream socket{why}"
    return None


def _has_peer(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
