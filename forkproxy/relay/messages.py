"""A worker's one buffer for whole messages: datagrams and sequential packets.

Each message is read into it and sent on from it at once (a message that must wait is
copied out), so one buffer serves every datagram listener, session and sequential-packet
connection of the worker. It holds the largest message a sender can make: a UDP payload
is at most 65,527 bytes (65,507 over IPv4); a unix datagram or packet is at most its
sender's send buffer less 32 bytes, and an unprivileged sender's SO_SNDBUF is at most
twice net.core.wmem_max (socket(7)). A larger message (a sender with CAP_NET_ADMIN's
SO_SNDBUFFORCE) is seen through MSG_TRUNC and dropped, never sent cut short. The memory
is anonymous and private: a page is touched only once a message that large comes.
Never reads or sends itself.
"""

import _socket
import mmap
import socket

UDP_MESSAGE_MAX = 65536  # covers a UDP payload over IPv4 and IPv6
_UNIX_OVERHEAD = 32  # unix(7) datagrams: len must be at most sk_sndbuf - 32
_WMEM_MAX = "/proc/sys/net/core/wmem_max"
_WMEM_MAX_DEFAULT = 212992
_SEND_BUFFER_SLACK = 4096  # over the message, when a send buffer must grow to take it


def unix_message_max() -> int:
    """The largest unix datagram or packet an unprivileged sender can make."""
    try:
        with open(_WMEM_MAX) as limit:
            wmem_max = int(limit.read())
    except (OSError, ValueError):
        wmem_max = _WMEM_MAX_DEFAULT
    return 2 * wmem_max - _UNIX_OVERHEAD


class MessageBuffer:
    """`size` bytes of anonymous memory and a memoryview of them, for the whole worker."""

    __slots__ = ("size", "memory", "view")

    def __init__(self, size: int) -> None:
        self.size = size
        self.memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.memory)


def message_buffer_size(unix: bool) -> int:
    """The bytes a worker's buffer holds: a UDP payload, or a unix message too."""
    return max(UDP_MESSAGE_MAX, unix_message_max()) if unix else UDP_MESSAGE_MAX


def message_buffer(unix: bool) -> MessageBuffer:
    """The buffer a worker needs: for UDP only, or for unix messages too."""
    return MessageBuffer(message_buffer_size(unix))


def grow_send_buffer(sock: _socket.socket, size: int) -> bool:
    """Make room for a message of `size` bytes in `sock`'s send buffer (a unix message
    must fit it whole: EMSGSIZE otherwise). False if the kernel keeps it smaller: it
    doubles what is asked, up to twice net.core.wmem_max."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size + _SEND_BUFFER_SLACK)
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= size + _UNIX_OVERHEAD
    except OSError:
        return False
