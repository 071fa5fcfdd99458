"""One relayed connection: two spliced directions, half-close, teardown, byte counts.

Bytes go socket -> pipe -> socket with splice(2) and never enter Python, but for the
bytes at a TCP urgent mark, where splice cannot go on (urgent.py). Each
direction borrows a pipe from its worker's `PipePool` only while it holds bytes in
flight, so an idle connection costs two descriptors, not six (systemd-socket-proxyd
keeps two pipes per connection for its whole life).

Each direction is a `Direction` (direction.py): splice(2) from one socket to a pipe and
on to the other, with exact backpressure.

How a connection ends (the compiled engine must do the same):

- Clean end. A direction ends when its source has sent EOF (splice(2) returned 0) and every
  byte read before it has been written: the EOF is passed on as shutdown(SHUT_WR) of the
  destination, and the other direction keeps going. Once both have ended, both sockets are
  closed (`close`). Each peer has had all the bytes and a FIN.
- Abort. Anything else ends the connection at once (`fail`): an error from splice(2) on
  either socket, reading or writing, whatever the errno (ECONNRESET, EPIPE, ETIMEDOUT, ...);
  an error from shutdown(2) other than the peer being gone; no pipe to be had; the
  --idle-timeout or --graceful-timeout closing it; an exception escaping the connection's
  own code (`salvage`). Both sockets are closed with SO_LINGER {1, 0}, so a TCP peer gets an
  RST rather than a FIN and reads ECONNRESET: a stream cut short is never mistaken for a
  complete one (the end of a close-delimited response, an upload). On the socket that
  failed this changes nothing, it is reset or unusable already; on the other it passes the
  abort on. Bytes still in the pipes or in the sockets' send queues are dropped, as the
  kernel drops those of a reset connection. Unix and vsock sockets have no RST: a unix peer
  reads EOF (or ECONNRESET if it had sent bytes forkproxy had not read yet).
- An abort is seen when forkproxy next reads from or writes to that socket: at once while
  the direction from it is reading; once the other side has taken the bytes in flight while
  it is paused by backpressure; at the next byte for it once it has sent its EOF.

Never accepts, admits or logs above debug. Closing breaks every reference cycle of a
connection, so its objects are freed at once by reference counting, not by the cyclic
garbage collector.
"""

import socket
import struct
from collections.abc import Callable

from forkproxy.relay.direction import PEER_GONE_ERRNOS as PEER_GONE_ERRNOS
from forkproxy.relay.direction import READS_PER_WAKEUP as READS_PER_WAKEUP
from forkproxy.relay.direction import Direction as Direction
from forkproxy.relay.direction import IdleDirection as IdleDirection
from forkproxy.relay.pipes import Pipe as Pipe
from forkproxy.relay.pipes import PipePool as PipePool
from forkproxy.relay.pipes import check_pipe_size as check_pipe_size
from forkproxy.relay.poller import Readiness
from forkproxy.shared.layout import ROW_WORDS

_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff 1, l_linger 0}

# A connection's `token` while it holds no admission (not set yet, given back, or handed
# over to its relay): below every value `Admitter.admit` returns (shared/admission.py).
NO_TOKEN = -(1 << 16)


class Relay:
    """A connected client and target, relayed both ways until both ends are done.

    Owns both sockets from `start()` and closes them exactly once, then calls
    `on_close(relay)` exactly once so the worker can release the connection's admission.
    """

    __slots__ = (
        "io",
        "pool",
        "client",
        "target",
        "client_to_target",
        "target_to_client",
        "on_close",
        "closed",
        "token",
        "started",
        "peer",
        "error",
        "ended_by",
        "log_end",
        "active",
        "quiet_since",
        "target_row",
    )

    def __init__(
        self,
        io: "Readiness",
        pool: PipePool,
        client: socket.socket,
        target: socket.socket,
        counters: memoryview,
        to_target_field: int,
        to_client_field: int,
        on_close: Callable[["Relay"], None],
        direction: type[Direction] = Direction,
        target_row: memoryview | None = None,
    ) -> None:
        self.io = io
        self.pool = pool
        self.client = client
        self.target = target
        self.on_close: Callable[[Relay], None] | None = on_close  # None once called
        self.closed = False
        self.token = NO_TOKEN  # the admission this connection holds; set by the worker
        self.started = 0.0  # when the client was accepted; set by the worker
        self.peer: object = None  # the client's address, for logs; set by the worker
        self.error: OSError | None = None  # what aborted the connection; None: a clean end
        self.ended_by = -1  # the fd whose error aborted it, or whose EOF came first
        self.log_end: Callable[[Relay], None] | None = None  # --access-log: its line
        # --idle-timeout: an IdleDirection sets `active` on a read; the worker's sweep
        # clears it and keeps `quiet_since`, when it last found the relay inactive.
        self.active = False
        self.quiet_since = 0.0
        # The worker's row of counters for the target (layout.py): bytes each way here,
        # the connection's count by its connector. A spare row if it has none.
        self.target_row = _spare_row() if target_row is None else target_row
        self.client_to_target = direction(self, client, target, counters, to_target_field)
        self.target_to_client = direction(self, target, client, counters, to_client_field)

    def start(self) -> None:
        self.client_to_target.start()
        self.target_to_client.start()

    def on_direction_done(self) -> None:
        if self.client_to_target.done and self.target_to_client.done:
            self.close()

    def close(self) -> None:
        """The clean end: both EOFs passed on, so close both sockets as they are."""
        if not self.closed:
            self._teardown(False)

    def fail(self, error: OSError, fd: int = -1) -> None:
        """Abort the connection (see the module docstring); `on_close` sees `error`, the
        first one if several came, and `ended_by` the socket it came from (-1: none)."""
        if self.error is None:
            self.error, self.ended_by = error, fd
        if not self.closed:
            self._teardown(True)

    def salvage(self, error: OSError) -> None:
        """An exception escaped from this relay's code: abort it, finishing a teardown
        that the exception may have cut short. Each step below is done at most once
        however often this runs; `on_close` sees `error`."""
        self.error = error
        self._teardown(True)

    def _teardown(self, abort: bool) -> None:
        self.closed = True
        io = self.io
        client = self.client
        target = self.target
        # Forget an fd only while its socket is open: once closed, the number may be
        # another connection's.
        if client.fileno() >= 0:
            io.forget(self.client_to_target.src_fd)
        if target.fileno() >= 0:
            io.forget(self.target_to_client.src_fd)
        self.client_to_target.stop()
        self.target_to_client.stop()
        if abort:
            reset_on_close(client)
            reset_on_close(target)
        client.close()  # a socket object forgets its fd before closing it: never twice
        target.close()
        on_close = self.on_close
        if on_close is not None:
            self.on_close = None
            on_close(self)


def _spare_row() -> memoryview:
    return memoryview(bytearray(ROW_WORDS * 8)).cast("q")


def reset_on_close(sock: socket.socket) -> None:
    """SO_LINGER {1, 0}: the close that follows sends an RST, not a FIN (socket(7))."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # closed already, or a socket family without lingering
