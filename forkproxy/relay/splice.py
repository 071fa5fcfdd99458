"""One relayed connection: two spliced directions, half-close, teardown, byte counts.

Bytes go socket -> pipe -> socket with splice(2) and never enter Python, but for the
bytes at a TCP urgent mark, where splice cannot go on (urgent.py). Each
direction borrows a pipe from its worker's `PipePool` only while it holds bytes in
flight, so an idle connection costs two descriptors, not six (systemd-socket-proxyd
keeps two pipes per connection for its whole life).

Per direction, a source socket is read while its pipe has room, and the pipe is flushed
to the destination at once; only when the destination cannot take everything is a writer
registered, and only when the pipe is full does reading pause (exact backpressure, no
busy loop). A read that filled the pipe which the destination then took whole is tried
again, up to READS_PER_WAKEUP times, so a bulk stream moves several pipes per wakeup; so
is one whose peer has sent its FIN, so the EOF costs no wakeup of its own. Interest is
registered with the worker's `Poller` (poller.py).

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

With --idle-timeout the directions are `IdleDirection`s, which flag the relay `active` on
every read for the worker's sweep to see; without it nothing is done per event for it.
Never accepts, admits or logs above debug. Closing breaks every reference cycle of a
connection, so its objects are freed at once by reference counting, not by the cyclic
garbage collector.
"""

import errno
import os
import socket
import struct
from collections.abc import Callable

from forkproxy.relay.pipes import Pipe as Pipe
from forkproxy.relay.pipes import PipePool as PipePool
from forkproxy.relay.pipes import check_pipe_size as check_pipe_size
from forkproxy.relay.poller import Readiness
from forkproxy.relay.urgent import at_urgent_mark, read_urgent_inline
from forkproxy.shared.layout import ROW_WORDS, T_BYTES_TO_CLIENT, T_BYTES_TO_TARGET

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_splice = os.splice
READS_PER_WAKEUP = 4  # full pipes a direction moves per readable event, at most
_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff 1, l_linger 0}
# One item per read; true for the first, the one the readiness event was about.
_READ_ROUNDS = (True,) + (False,) * (READS_PER_WAKEUP - 1)

# A connection's `token` while it holds no admission (not set yet, given back, or handed
# over to its relay): below every value `Admitter.admit` returns (shared/admission.py).
NO_TOKEN = -(1 << 16)

# Errors that mean the peer went away: an abort passed on, logged at debug level only.
PEER_GONE_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENOTCONN,
    }
)


class Direction:
    """Bytes flowing from one socket of a relay to the other."""

    __slots__ = (
        "relay",
        "io",
        "pool",
        "src",
        "src_fd",
        "dst",
        "dst_fd",
        "pipe",
        "pending",
        "reading",
        "writing",
        "eof",
        "done",
        "counters",
        "counter_field",
        "target_counters",
        "target_field",
        "on_readable",
        "on_writable",
    )

    def __init__(
        self,
        relay: "Relay",
        src: socket.socket,
        dst: socket.socket,
        counters: memoryview,
        counter_field: int,
    ) -> None:
        self.relay: Relay | None = relay  # None once closed: no reference cycle outlives it
        self.io = relay.io
        self.pool = relay.pool
        self.src = src
        self.src_fd = src.fileno()
        self.dst = dst
        self.dst_fd = dst.fileno()
        self.pipe: Pipe | None = None
        self.pending = 0  # bytes in self.pipe
        self.reading = False  # a reader is registered on the source
        self.writing = False  # a writer is registered on the destination
        self.eof = False  # the source has sent EOF
        self.done = False  # EOF passed on; this direction is finished
        self.counters = counters
        self.counter_field = counter_field
        # The same bytes again in the relay's row of its target (layout.py).
        self.target_counters = relay.target_row
        self.target_field = T_BYTES_TO_TARGET if src is relay.client else T_BYTES_TO_CLIENT
        # Bound once: registering interest allocates no new callables.
        self.on_readable: Callable[[], None] | None = self._on_readable
        self.on_writable: Callable[[], None] | None = self._on_writable

    def start(self) -> None:
        self.reading = True
        self.io.add_reader(self.src_fd, self.on_readable)  # type: ignore[arg-type]

    def _on_readable(self) -> None:
        # Move up to READS_PER_WAKEUP full pipes before giving other connections a turn:
        # a bulk stream costs one trip through the loop per that many bytes, not per pipe.
        for first in _READ_ROUNDS:
            pipe = self.pipe
            if pipe is None:
                try:
                    pipe = self.pipe = self.pool.acquire()
                except OSError as error:
                    self._fail(error)
                    return
            room = pipe.capacity - self.pending
            try:
                count = _splice(self.src_fd, pipe.write_fd, room, None, None, _SPLICE_FLAGS)
            except BlockingIOError:
                # Nothing moved: a read of a later round found the socket empty, or the
                # pipe ran out of slots before bytes (each skb fragment takes a slot).
                if self.pending:
                    self._pause_reading()
                    return
                # Or, reported readable yet empty: TCP urgent data, at whose mark splice(2)
                # stops for good while the socket stays readable (a busy loop). Read past
                # it once, the urgent byte inline. (A later round's EAGAIN needs no look:
                # a mark left there is met by the next wakeup's first read.)
                if not first or not at_urgent_mark(self.src_fd):
                    self._return_pipe()
                    return
                try:
                    count = read_urgent_inline(self.src, pipe.write_fd, room)
                except OSError as error:
                    self._fail(error)
                    return
                if count == 0:  # nothing to read after all
                    self._return_pipe()
                    return
            except OSError as error:
                self._fail(error)
                return
            if count == 0:
                self.eof = True
                if not self.pending:
                    self._return_pipe()
                    self._finish()  # may close the relay, which forgets both sockets
                self._pause_reading()  # else EOF would stay readable; nothing if closed
                return
            self.pending += count
            self._flush()
            if self.pipe is not None or not self.reading:
                return  # the destination did not take it all: wait for it
            # Read again if this read filled the pipe, or if the peer has sent its FIN:
            # then the EOF is read now, not on a wakeup of its own.
            if count < room and not self.io.peer_closed:
                return

    def _on_writable(self) -> None:
        if self.pipe is not None:  # else a stale event after teardown began
            self._flush()

    def _flush(self) -> None:
        pipe = self.pipe
        assert pipe is not None
        try:
            count = _splice(pipe.read_fd, self.dst_fd, self.pending, None, None, _SPLICE_FLAGS)
        except BlockingIOError:
            count = 0
        except OSError as error:
            self._fail(error)
            return
        if count:
            self.pending -= count
            self.counters[self.counter_field] += count
            self.target_counters[self.target_field] += count
        if self.pending:
            if not self.writing:
                self.writing = True
                self.io.add_writer(self.dst_fd, self.on_writable)  # type: ignore[arg-type]
            if self.reading and self.pending >= pipe.capacity:
                self._pause_reading()
            return
        self._return_pipe()
        if self.writing:
            self.writing = False
            self.io.remove_writer(self.dst_fd)
        if self.eof:
            self._finish()
        elif not self.reading:
            self.reading = True
            self.io.add_reader(self.src_fd, self.on_readable)  # type: ignore[arg-type]

    def _pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.io.remove_reader(self.src_fd)

    def _return_pipe(self) -> None:
        pipe = self.pipe
        if pipe is not None:
            self.pipe = None
            self.pool.release(pipe)

    def _fail(self, error: OSError) -> None:
        relay = self.relay
        if relay is not None:
            relay.fail(error)

    def _finish(self) -> None:
        """EOF read and every byte delivered: pass the EOF on (half-close)."""
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as error:
            if error.errno not in PEER_GONE_ERRNOS:
                self._fail(error)
                return
        relay = self.relay
        if relay is not None:
            relay.on_direction_done()

    def stop(self) -> None:
        """Drop the pipe and every reference back to the relay; the relay has made the
        poller forget both sockets and closes them."""
        self.reading = self.writing = False
        self.relay = None
        self.on_readable = self.on_writable = None
        pipe = self.pipe
        if pipe is not None:
            self.pipe = None
            if self.pending:
                pipe.close()  # holds bytes nobody will read
            else:
                self.pool.release(pipe)
            self.pending = 0


class IdleDirection(Direction):
    """A Direction that marks its relay active on each read (--idle-timeout)."""

    __slots__ = ()

    def _on_readable(self) -> None:
        relay = self.relay
        if relay is not None:
            relay.active = True
        Direction._on_readable(self)


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

    def fail(self, error: OSError) -> None:
        """Abort the connection (see the module docstring); `on_close` sees `error`, the
        first one if several came."""
        if self.error is None:
            self.error = error
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
