"""TCP urgent data, where splice(2) stops: find the mark, and read past it once.

A peer's urgent byte (`MSG_OOB`) stops splice(2) at its mark for good while the socket
stays readable, which would make a relay spin. The relay (splice.py) asks `at_urgent_mark`
when a readable socket gave nothing, and `read_urgent_inline` moves the bytes at the mark
into its pipe, the urgent byte inline in its place. The one place relayed bytes pass
through Python, and only when a peer sends urgent data. Never registers interest or logs.
"""

import fcntl
import os
import socket

_SIOCATMARK = 0x8905  # ioctl: at the TCP urgent mark? (linux/sockios.h)
_INT_ZERO = bytes(4)
_URGENT_READ = 4096  # bytes read through Python at an urgent mark, at most


def at_urgent_mark(fd: int) -> bool:
    """Whether the next byte to read from the TCP socket `fd` is urgent data (SIOCATMARK)."""
    try:
        return fcntl.ioctl(fd, _SIOCATMARK, _INT_ZERO) != _INT_ZERO
    except OSError:
        return False  # not a TCP socket: it has no urgent data


def read_urgent_inline(src: socket.socket, pipe_fd: int, room: int) -> int:
    """Move the bytes at the urgent mark into the pipe through a plain read, the urgent
    byte in its place in the stream (SO_OOBINLINE), so splice can go on after it.

    The one place bytes pass through Python, and only when a peer sends urgent data.
    """
    src.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    try:
        data = src.recv(min(room, _URGENT_READ))
    except BlockingIOError:
        return 0
    return os.write(pipe_fd, data)  # an empty pipe takes it whole: room >= len(data)
