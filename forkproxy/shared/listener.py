"""The `Listener` value: a socket the workers take clients from, its kind and its owner.

The supervisor makes them (`activation` adopts passed sockets, `listeners` binds
--listen addresses) and hands them to every worker, which accepts on a stream or
sequential-packet listener, and reads datagrams from a datagram one.
`is_connection` tells a passed connection (Accept=yes, --inetd) from a listener. Never
binds, listens, shuts down or unlinks.
"""

import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Listener:
    """A socket the workers take clients from: listening (stream, sequential-packet) or
    bound (datagram).

    `kind` is its SO_TYPE. `unlink_path` is set only for a unix socket file forkproxy
    created itself (--listen), which it removes at exit; passed sockets belong to systemd.
    """

    sock: socket.socket
    name: str
    label: str
    unlink_path: str | None = None
    unlink_inode: int = 0  # the file we created, so we never remove a successor's
    kind: int = socket.SOCK_STREAM

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    @property
    def metrics_name(self) -> str:
        """How metrics, and the target table's rows, name it: its name, else its label."""
        return self.name or self.label

    @property
    def is_datagram(self) -> bool:
        """Read datagram by datagram (UDP, unix datagram), not accepted on."""
        return self.kind == socket.SOCK_DGRAM


def is_connection(fd: int) -> bool:
    """Whether `fd` is a connected stream socket (what Accept=yes passes), not a listener.

    A stream socket that is neither listening nor connected (bound, listen() never
    called) is neither: the caller refuses it as a listener.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
            return False
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        try:
            sock.getpeername()
        except OSError:
            # No peer: never connected, or a connection the client already reset (its
            # error still pending, and the relay ends it as any reset connection).
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        return True
    except OSError:
        return False
    finally:
        sock.detach()  # only looked at it
