"""One datagram session: a client address and its own socket to the target.

A `Session` owns a socket connected to its target through which every datagram of its
client goes out: a UDP socket on an ephemeral port of its own, or a unix datagram socket
autobound to an abstract address of its own (unix(7)), so that the target's replies come
back to it and to no other session. What comes back is sent to the client from the
listening socket, the address the client wrote to. `open_session_socket` makes that
socket. A session whose target is a host name holds its client's first datagrams (a
few, copied) while the name is resolved. Never reads the listener, admits or logs:
its `DatagramListener` (datagram.py) does.
"""

import _socket
import errno
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forkproxy.relay.datagram import DatagramListener

_MSG_TRUNC = socket.MSG_TRUNC
_SESSION_TYPE = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
PENDING_MAX = 16  # datagrams held while the target's name is resolved; more are dropped

# Why a session ended (the access log's end=, once it exists).
END_TIMEOUT = "timeout"  # --datagram-timeout passed without a datagram either way
END_REPLIES = "replies"  # --datagram-replies replies were sent
END_ERROR = "error"  # the target refused (an ICMP error), or the session socket failed
END_STOPPED = "stopped"  # the worker's graceful timeout ended it

# A client's address as recvfrom(2) gives it: (host, port[, flowinfo, scope]) for UDP, a
# path or abstract name for unix, None for a unix client that bound no address.
Address = Any
_NO_ADDRESS = OSError(errno.EDESTADDRREQ, "the client has no address to reply to")


def open_session_socket(family: int, sockaddr: object) -> _socket.socket:
    """A non-blocking datagram socket connected to a target, bound to an address of its
    own where the target's replies come back; OSError if it cannot be made.

    A bare `_socket.socket`: the `socket.socket` subclass adds nothing a session uses and
    costs a Python-level constructor per session (--datagram-replies=1: one per request).
    """
    sock = _socket.socket(family, _SESSION_TYPE)
    try:
        if family == socket.AF_UNIX:
            sock.bind("")  # autobind: an abstract name of its own (unix(7))
        sock.connect(sockaddr)  # type: ignore[arg-type]
    except OSError:
        sock.close()
        raise
    return sock


class Session:
    """A client of a datagram listener, and the socket its datagrams go out through."""

    __slots__ = (
        "owner",
        "client",
        "sock",
        "fd",
        "send",
        "target_index",
        "token",
        "replies",
        "active",
        "quiet_since",
        "bytes_to_target",
        "bytes_to_client",
        "pending",
        "closed",
    )

    def __init__(self, owner: "DatagramListener", client: Address, token: int) -> None:
        self.owner: DatagramListener | None = owner  # None once ended: no cycle outlives it
        self.client = client  # its address, the key of its owner's sessions
        self.sock: _socket.socket | None = None  # None while its target is resolved
        self.fd = -1
        self.send: Callable[[memoryview | bytes], int] | None = None
        self.target_index = -1  # in its owner's target group
        self.token = token  # what its admission returned: the admitter takes it back
        self.replies = 0
        self.active = True  # a datagram either way since the last sweep
        self.quiet_since = 0.0  # set by the sweep that first finds it not active
        self.bytes_to_target = 0
        self.bytes_to_client = 0
        self.pending: list[bytes] | None = None  # datagrams held while resolving
        self.closed = False

    def attach(self, sock: _socket.socket, target_index: int) -> None:
        """The session's socket is connected to target `target_index`: use it."""
        self.sock = sock
        self.fd = sock.fileno()
        self.send = sock.send
        self.target_index = target_index

    def on_readable(self) -> None:
        """A reply from the target: to the client, from the listening socket. One per
        readable event: most sessions get one at a time, and a second read would mostly
        find nothing (EAGAIN, an exception); a session with more queued is ready again at
        once (the poller is level-triggered)."""
        owner = self.owner
        sock = self.sock
        if owner is None or sock is None:
            return
        try:
            count = sock.recv_into(owner.buffer, 0, _MSG_TRUNC)
        except BlockingIOError:
            return
        except OSError as error:
            owner.on_session_error(self, error)
            return
        self.active = True
        client = self.client
        if count > owner.size:
            owner.drops.truncated(owner.family, client, count, owner.size)
            return
        try:
            if client is None:
                raise _NO_ADDRESS
            owner.reply(owner.view[:count], client)
        except OSError as error:
            owner.drops.reply(owner.family, client, error)
            return
        self.bytes_to_client += count
        owner.replied += 1  # to the row once the batch of callbacks is done
        owner.replied_bytes += count
        self.replies += 1
        if self.replies == owner.replies_max:
            owner.end_session(self, END_REPLIES)

    def on_writable(self) -> None:
        """The target can take the datagram its owner holds for this session."""
        owner = self.owner
        if owner is not None:
            owner.backpressure.on_writable(self)


def is_refusal(error: OSError) -> bool:
    """Whether a session socket's error says the target is not there (an ICMP error on
    UDP, no listener on a unix socket), rather than something of this machine."""
    return error.errno in (
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENOENT,
        errno.EPERM,  # a firewall's reject, or a unix target connected elsewhere
    )
