"""Opening one client's connection to its target without blocking the loop.

A numeric target is connected at once; a host name is resolved off the loop (the
loop's getaddrinfo) on every connection, as systemd-socket-proxyd does, and each address
it yields is tried in turn until one connects. Each address gets --connect-timeout, which
the worker's sweep enforces through `expire` (no timer per connection), and TCP sockets
get their options before connect(). Never relays and never logs: the outcome
goes to the caller's `on_connected(sock)` or `on_failed(error)`, exactly one of them.
"""

import errno
import math
import socket
import time
from collections.abc import Callable
from os import strerror
from typing import TYPE_CHECKING

from forkproxy.relay.splice import Readiness
from forkproxy.settings.address import SockAddr, TargetAddress

if TYPE_CHECKING:
    import asyncio

_CONNECTING_ERRNOS = frozenset({errno.EINPROGRESS})
TCP_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6})
_monotonic = time.monotonic

SocketOptions = tuple[tuple[int, int, int], ...]  # (level, option, value) for setsockopt(2)


def set_socket_options(sock: socket.socket, options: SocketOptions) -> None:
    """Apply `options` to a TCP socket; OSError if the kernel refuses one."""
    setsockopt = sock.setsockopt
    for level, option, value in options:
        setsockopt(level, option, value)


def send_proxy_header(target: socket.socket, header: bytes) -> None:
    """Send a PROXY protocol header in one send(2), before any relayed byte.

    nginx reads the header from its first read and rejects one split across segments,
    so a short send is an error, not something to finish later. A new connection's
    send buffer is empty, so it takes the whole header (at most 232 bytes) at once.
    """
    sent = target.send(header)
    if sent != len(header):
        raise OSError(errno.EMSGSIZE, f"sent {sent} of {len(header)} bytes")


class TargetConnect:
    """One connection attempt: every address of the target in turn, then give up."""

    __slots__ = (
        "_loop",
        "_io",
        "_target",
        "_on_connected",
        "_on_failed",
        "_sock",
        "_addresses",
        "_next",
        "_error",
        "_task",
        "_finished",
        "_timeout",
        "_options",
        "deadline",
    )

    def __init__(
        self,
        loop: "asyncio.AbstractEventLoop",
        io: Readiness,
        target: TargetAddress,
        on_connected: Callable[[socket.socket], None],
        on_failed: Callable[[OSError], None],
        timeout: float = math.inf,
        options: SocketOptions = (),
    ) -> None:
        self._loop = loop  # resolves host names
        self._io = io  # watches the connecting socket
        self._target = target
        self._on_connected = on_connected
        self._on_failed = on_failed
        self._sock: socket.socket | None = None
        self._addresses: list[tuple[int, SockAddr | tuple[int, bytes]]] = []
        self._next = 0
        self._error: OSError | None = None
        self._task: asyncio.Task[None] | None = None
        self._finished = False
        self._timeout = timeout  # per address tried, resolving included
        self._options = options  # for TCP sockets only
        self.deadline = math.inf  # when the step under way (resolve, connect) times out

    def start(self) -> None:
        target = self._target
        if target.needs_resolving:
            self.deadline = _monotonic() + self._timeout
            self._task = self._loop.create_task(self._resolve())
        else:
            assert target.sockaddr is not None
            self._addresses = [(target.family, target.sockaddr)]
            self._try_next()

    def cancel(self) -> None:
        """Abandon the attempt (worker shutting down); no callback will run."""
        self._finished = True
        if self._task is not None:
            self._task.cancel()
        self._drop_socket()

    def expire(self, now: float) -> bool:
        """Past the deadline: give up the step under way as timed out (ETIMEDOUT) and go
        on with the next address, or fail. Returns whether the deadline had passed."""
        if self._finished or now < self.deadline:
            return False
        self.deadline = math.inf
        error = OSError(errno.ETIMEDOUT, strerror(errno.ETIMEDOUT))
        task = self._task
        if task is not None:  # still resolving
            self._task = None
            task.cancel()
            self._fail(error)
            return True
        self._drop_socket()
        self._error = error
        self._try_next()
        return True

    async def _resolve(self) -> None:
        target = self._target
        try:
            infos = await self._loop.getaddrinfo(
                target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except (OSError, UnicodeError) as error:
            self._fail(OSError(errno.EHOSTUNREACH, f"cannot resolve '{target.host}': {error}"))
            return
        self._task = None
        if self._finished:
            return
        self._addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
        self._try_next()

    def _try_next(self) -> None:
        while self._next < len(self._addresses):
            family, sockaddr = self._addresses[self._next]
            self._next += 1
            try:
                sock = socket.socket(
                    family, self._target.kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                )
            except OSError as error:
                self._error = error
                continue
            if self._options and family in TCP_FAMILIES:
                try:
                    set_socket_options(sock, self._options)
                except OSError as error:
                    sock.close()
                    self._error = error
                    continue
            code = sock.connect_ex(sockaddr)
            if code == errno.EINPROGRESS:
                # On loopback the handshake usually completes inside connect(2), which
                # still says EINPROGRESS: asking again costs one call and answers 0, where
                # waiting costs a registration, a trip through the loop and SO_ERROR.
                again = sock.connect_ex(sockaddr)
                if again in (0, errno.EISCONN):
                    code = 0
                elif again not in (errno.EALREADY, errno.EINPROGRESS):
                    code = again  # refused meanwhile
            if code == 0:
                self._succeed(sock)
                return
            if code in _CONNECTING_ERRNOS:
                self._sock = sock
                self.deadline = _monotonic() + self._timeout
                self._io.add_writer(sock.fileno(), self._on_writable)
                return
            sock.close()
            self._error = OSError(code, strerror(code))
        self._fail(self._error or OSError(errno.EHOSTUNREACH, "no address to connect to"))

    def _on_writable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        self._io.remove_writer(sock.fileno())
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            self._sock = None
            self._succeed(sock)
            return
        self._drop_socket()
        self._error = OSError(code, strerror(code))
        self._try_next()

    def _drop_socket(self) -> None:
        sock = self._sock
        if sock is not None:
            self._sock = None
            self._io.remove_writer(sock.fileno())
            sock.close()

    def _succeed(self, sock: socket.socket) -> None:
        self._finished = True
        self._on_connected(sock)

    def _fail(self, error: OSError) -> None:
        if not self._finished:
            self._finished = True
            self._on_failed(error)
