"""The `Listener` value: a listening stream socket the workers accept on, and its owner.

The supervisor makes them (`activation` adopts passed sockets, `listeners` binds
--listen addresses) and hands them to every worker, which only accepts on them.
`is_connection` tells a passed connection (Accept=yes, --inetd) from a listener. Never
binds, listens, shuts down or unlinks.
"""

import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Listener:
    """A listening stream socket the workers accept on.

    `unlink_path` is set only for a unix socket file forkproxy created itself (--listen),
    which it removes at exit; passed sockets belong to systemd.
    """

    sock: socket.socket
    name: str
    label: str
    unlink_path: str | None = None
    unlink_inode: int = 0  # the file we created, so we never remove a successor's

    @property
    def fd(self) -> int:
        return self.sock.fileno()


def is_connection(fd: int) -> bool:
    """Whether `fd` is a connected stream socket (what Accept=yes passes), not a listener."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_TYPE
        ) == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        return False
    finally:
        sock.detach()  # only looked at it
