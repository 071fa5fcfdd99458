"""Opening one client's connection to the upstream target without blocking the loop.

A numeric target is connected at once; a host name is resolved off the loop (the
loop's getaddrinfo) on every connection, as systemd-socket-proxyd does, and each address
it yields is tried in turn until one connects. Never relays and never logs: the outcome
goes to the caller's `on_connected(sock)` or `on_failed(error)`, exactly one of them.
"""

import asyncio
import errno
import socket
from collections.abc import Callable
from os import strerror

from forkproxy.address import SockAddr, UpstreamAddress

_CONNECTING_ERRNOS = frozenset({errno.EINPROGRESS})


class UpstreamConnect:
    """One connection attempt: every address of the target in turn, then give up."""

    __slots__ = (
        "_loop",
        "_target",
        "_on_connected",
        "_on_failed",
        "_sock",
        "_addresses",
        "_next",
        "_error",
        "_task",
        "_finished",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        target: UpstreamAddress,
        on_connected: Callable[[socket.socket], None],
        on_failed: Callable[[OSError], None],
    ) -> None:
        self._loop = loop
        self._target = target
        self._on_connected = on_connected
        self._on_failed = on_failed
        self._sock: socket.socket | None = None
        self._addresses: list[tuple[int, SockAddr | tuple[int, bytes]]] = []
        self._next = 0
        self._error: OSError | None = None
        self._task: asyncio.Task[None] | None = None
        self._finished = False

    def start(self) -> None:
        target = self._target
        if target.needs_resolving:
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
                    family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                )
            except OSError as error:
                self._error = error
                continue
            code = sock.connect_ex(sockaddr)
            if code == 0:
                self._succeed(sock)
                return
            if code in _CONNECTING_ERRNOS:
                self._sock = sock
                self._loop.add_writer(sock.fileno(), self._on_writable)
                return
            sock.close()
            self._error = OSError(code, strerror(code))
        self._fail(self._error or OSError(errno.EHOSTUNREACH, "no address to connect to"))

    def _on_writable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        self._loop.remove_writer(sock.fileno())
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
            self._loop.remove_writer(sock.fileno())
            sock.close()

    def _succeed(self, sock: socket.socket) -> None:
        self._finished = True
        self._on_connected(sock)

    def _fail(self, error: OSError) -> None:
        if not self._finished:
            self._finished = True
            self._on_failed(error)
