"""One active check of one target, run from the master's selector loop.

A `Probe` connects without blocking to each address of the target in turn until one
connects; then, with --proxy-protocol, sends the header a health check sends (v1
`PROXY UNKNOWN`, v2 LOCAL: "the proxy's own connection", which nginx and HAProxy take),
and with --check-http an HTTP/1.1 GET (Host: the target) in the same send, and reads
until the status line. 2xx and 3xx pass; anything else fails with its reason
(`CheckReason`, and a detail: errno or status). The verdict goes to `on_done` exactly
once, after the socket is closed; the caller enforces the deadline with `expire`. Never
logs, never blocks, never resolves a name (health.py hands it addresses).
"""

import errno
import re
import selectors
import socket
import time
from collections.abc import Callable, Sequence

from forkproxy.relay.proxy_protocol import encode_v1, encode_v2
from forkproxy.settings.address import SockAddr
from forkproxy.shared.targets_table import CheckReason

Address = tuple[int, SockAddr]  # (family, sockaddr) as connect(2) takes it
OnDone = Callable[[CheckReason, int], None]  # (reason, errno or HTTP status)

MAX_STATUS_LINE = 4096  # bytes read for the status line at most
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})[ \r\n]")
_REFUSED = frozenset({errno.ECONNREFUSED, errno.ENOENT})
_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})
_RESET = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})


def check_request(proxy_protocol: int, http_path: str, host_header: str, user_agent: str) -> bytes:
    """What a check sends once connected: a PROXY header, an HTTP request, both or none."""
    header = b""
    if proxy_protocol:
        encode = encode_v1 if proxy_protocol == 1 else encode_v2
        header = encode(None, None, socket.AF_UNSPEC)  # UNKNOWN, LOCAL: no client
    if not http_path:
        return header
    request = (
        f"GET {http_path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: {user_agent}\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    )
    return header + request.encode("ascii")


def error_reason(code: int) -> CheckReason:
    """The reason a check failed with errno `code`."""
    if code in _REFUSED:
        return CheckReason.REFUSED
    if code == errno.ETIMEDOUT:
        return CheckReason.TIMEOUT
    if code in _UNREACHABLE:
        return CheckReason.UNREACHABLE
    if code in _RESET:
        return CheckReason.RESET
    return CheckReason.ERROR


class Probe:
    """One check: connect to `addresses` in turn, send `request`, read a status line if
    `http`; the verdict to `on_done`. Registered in `selector` while it runs."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        kind: int,
        addresses: Sequence[Address],
        request: bytes,
        http: bool,
        on_done: OnDone,
    ) -> None:
        self.selector = selector
        self.kind = kind
        self.addresses = list(addresses)
        self.request = memoryview(request)
        self.http = http
        self.on_done: OnDone | None = on_done
        self.sock: socket.socket | None = None
        self.connected = False
        self.received = bytearray()
        self.started = time.monotonic()
        self.last_error = errno.EHOSTUNREACH  # no address at all: unreachable
        self.crash: Exception | None = None  # a bug met in the check (the caller logs it)

    def start(self) -> None:
        self._guarded(self._next_address)

    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def expire(self) -> None:
        """Past the check's deadline: it failed as timed out."""
        self._finish(CheckReason.TIMEOUT, errno.ETIMEDOUT)

    def close(self) -> None:
        """Drop the check without a verdict (the master stops, or a new worker drops the
        master's copies of its sockets)."""
        self.on_done = None
        self._close_socket()

    # -- steps ----------------------------------------------------------------------------

    def _next_address(self) -> None:
        while self.addresses:
            family, sockaddr = self.addresses.pop(0)
            try:
                sock = socket.socket(family, self.kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            except OSError as error:
                self.last_error = error.errno or errno.EIO
                continue
            code = sock.connect_ex(sockaddr)
            if code in (0, errno.EINPROGRESS):
                self.sock = sock
                self.selector.register(sock, selectors.EVENT_WRITE, self._on_event)
                return
            sock.close()
            self.last_error = code
        code = self.last_error
        self._finish(error_reason(code), code)

    def _on_event(self) -> None:
        self._guarded(self._on_ready)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a step; an exception (a bug) fails the check instead of the master."""
        try:
            step()
        except Exception as error:
            self.crash = error
            self._finish(CheckReason.ERROR, errno.EIO)

    def _on_ready(self) -> None:
        sock = self.sock
        if sock is None:
            return
        if not self.connected:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.last_error = code
                self._close_socket()
                self._next_address()
                return
            self.connected = True
        if self.request:
            self._send(sock)
        elif self.http:
            self._read(sock)
        else:
            self._finish(CheckReason.PASSED, 0)  # connecting was the check

    def _send(self, sock: socket.socket) -> None:
        try:
            sent = sock.send(self.request)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            code = error.errno or errno.EIO
            self._finish(error_reason(code), code)
            return
        self.request = self.request[sent:]
        if self.request:
            return  # the rest when there is room (a PROXY header is never split: it is
            # at most 232 bytes, and a new socket's buffer is empty)
        if not self.http:
            self._finish(CheckReason.PASSED, 0)
            return
        self.selector.modify(sock, selectors.EVENT_READ, self._on_event)

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(MAX_STATUS_LINE - len(self.received))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            code = error.errno or errno.EIO
            self._finish(error_reason(code), code)
            return
        self.received += data
        match = _STATUS_LINE.match(self.received)
        if match is not None:
            status = int(match.group(1))
            passed = 200 <= status < 400
            self._finish(CheckReason.PASSED if passed else CheckReason.HTTP_STATUS, status)
        elif not data:
            self._finish(CheckReason.NO_RESPONSE, 0)
        elif not b"HTTP/1.".startswith(bytes(self.received[:7])) or (
            b"\n" in self.received or len(self.received) >= MAX_STATUS_LINE
        ):
            self._finish(CheckReason.BAD_RESPONSE, 0)

    def _finish(self, reason: CheckReason, detail: int) -> None:
        self._close_socket()
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(reason, detail)

    def _close_socket(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
