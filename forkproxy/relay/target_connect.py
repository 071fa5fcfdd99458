"""Opening one client's connection to its target without blocking the loop.

A numeric target is connected at once; a host name is resolved off the loop (the
loop's getaddrinfo) on every connection, as systemd-socket-proxyd does, and each address
it yields is tried in turn until one connects. Each address gets --connect-timeout, which
the worker's sweep enforces through `expire` (no timer per connection), and TCP sockets
get their options before connect(). Never relays and never logs: the outcome
goes to the caller's `on_connected(sock)` or `on_failed(error)`, exactly one of them,
which must not raise (the worker's connector guards its own).

What counts as a failed address: anything that goes wrong between socket(2) and a
connected socket, whatever Python raises for it. An errno from socket(2), setsockopt(2),
connect(2), SO_ERROR or the epoll registration; `socket.gaierror` from connect() itself
when a scoped IPv6 address names no interface (`[fe80::1%bogus0]:80`: an interface
removed while running, or a typo), which becomes ENODEV; any other exception (ValueError,
UnicodeError, ...), which becomes EINVAL with its text. The socket is closed and the next
address is tried; after the last, `on_failed` gets the last address's error. Resolving
fails the attempt as EHOSTUNREACH, whatever the resolver raised.
"""

import errno
import math
import socket
import time
from collections.abc import Callable
from os import strerror
from typing import TYPE_CHECKING

from forkproxy.relay.poller import Readiness
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


def attempt_error(error: Exception, sockaddr: object) -> OSError:
    """What an exception raised while connecting to one address means, as an OSError."""
    host = sockaddr[0] if isinstance(sockaddr, tuple) and len(sockaddr) == 4 else None
    if isinstance(error, socket.gaierror) and isinstance(host, str) and "%" in host:
        # connect() looks an IPv6 scope's name up itself (the address is checked already).
        scope = host.partition("%")[2]
        return OSError(errno.ENODEV, f"no network interface '{scope}' for '{host}'")
    if isinstance(error, OSError):
        return error
    return OSError(errno.EINVAL, f"{type(error).__name__}: {error}")


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

    def fileno(self) -> int:
        """The fd of the socket whose connect is under way, or -1."""
        sock = self._sock
        return -1 if sock is None else sock.fileno()

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
            addresses: list[tuple[int, SockAddr | tuple[int, bytes]]] = [
                (family, sockaddr) for family, _, _, _, sockaddr in infos
            ]
        except Exception as error:  # not CancelledError, a BaseException: expire() cancels
            self._task = None
            self._fail(OSError(errno.EHOSTUNREACH, f"cannot resolve '{target.host}': {error}"))
            return
        self._task = None
        if self._finished:
            return
        self._addresses = addresses
        self._try_next()

    def _try_next(self) -> None:
        while self._next < len(self._addresses):
            family, sockaddr = self._addresses[self._next]
            self._next += 1
            sock = None
            try:
                sock = socket.socket(
                    family, self._target.kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                )
                if self._options and family in TCP_FAMILIES:
                    set_socket_options(sock, self._options)
                code = sock.connect_ex(sockaddr)
                if code == errno.EINPROGRESS:
                    # On loopback the handshake usually completes inside connect(2), which
                    # still says EINPROGRESS: asking again costs one call and answers 0,
                    # where waiting costs a registration, a trip through the loop and
                    # SO_ERROR.
                    again = sock.connect_ex(sockaddr)
                    if again in (0, errno.EISCONN):
                        code = 0
                    elif again not in (errno.EALREADY, errno.EINPROGRESS):
                        code = again  # refused meanwhile
                if code in _CONNECTING_ERRNOS:
                    self._io.add_writer(sock.fileno(), self._on_writable)
                    self._sock = sock
                    self.deadline = _monotonic() + self._timeout
                    return
            except Exception as error:
                if sock is not None:
                    sock.close()
                self._error = attempt_error(error, sockaddr)
                continue
            if code == 0:
                self._succeed(sock)  # outside the try: the caller's code, not this attempt's
                return
            sock.close()
            self._error = OSError(code, strerror(code))
        self._fail(self._error or OSError(errno.EHOSTUNREACH, "no address to connect to"))

    def _on_writable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            self._io.remove_writer(sock.fileno())
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            error = None if code == 0 else OSError(code, strerror(code))
        except Exception as exc:
            error = attempt_error(exc, None)
        if error is None:
            self._sock = None
            self._succeed(sock)
            return
        self._drop_socket()
        self._error = error
        self._try_next()

    def _drop_socket(self) -> None:
        sock = self._sock
        if sock is not None:
            self._sock = None
            self._io.forget(sock.fileno())  # the close takes it out of the epoll
            sock.close()

    def _succeed(self, sock: socket.socket) -> None:
        self._finished = True
        self._on_connected(sock)

    def _fail(self, error: OSError) -> None:
        if not self._finished:
            self._finished = True
            self._on_failed(error)
