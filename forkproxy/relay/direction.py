"""One direction of a relayed connection: splice(2) from a socket to a pipe to a socket.

Per direction, a source socket is read while its pipe has room, and the pipe is flushed
to the destination at once; only when the destination cannot take everything is a writer
registered, and only when the pipe is full does reading pause (exact backpressure, no
busy loop). A read that filled the pipe which the destination then took whole is tried
again, up to READS_PER_WAKEUP times, so a bulk stream moves several pipes per wakeup; so
is one whose peer has sent its FIN, so the EOF costs no wakeup of its own. Interest is
registered with the worker's `Poller` (poller.py).

A direction ends when its source has sent EOF and every byte read before it has been
written: it passes the EOF on (shutdown(SHUT_WR) of the destination) and tells its
`Relay` (splice.py), which decides how the connection ends; any error is the relay's
abort. With --idle-timeout the directions are `IdleDirection`s, which flag the relay
`active` on every read for the worker's sweep to see; without it nothing is done per
event for it. Never closes a socket: the relay owns both.
"""

import errno
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from forkproxy.relay.pipes import Pipe
from forkproxy.relay.urgent import at_urgent_mark, read_urgent_inline
from forkproxy.shared.layout import T_BYTES_TO_CLIENT, T_BYTES_TO_TARGET

if TYPE_CHECKING:
    from forkproxy.relay.splice import Relay

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_splice = os.splice
READS_PER_WAKEUP = 4  # full pipes a direction moves per readable event, at most
# One item per read; true for the first, the one the readiness event was about.
_READ_ROUNDS = (True,) + (False,) * (READS_PER_WAKEUP - 1)

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
        "moved",
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
        self.moved = 0  # bytes written to the destination: the access log's count
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
                    self._fail(error, -1)
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
                    self._fail(error, self.src_fd)
                    return
                if count == 0:  # nothing to read after all
                    self._return_pipe()
                    return
            except OSError as error:
                self._fail(error, self.src_fd)
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
            self._fail(error, self.dst_fd)
            return
        if count:
            self.pending -= count
            self.moved += count
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

    def _fail(self, error: OSError, fd: int = -1) -> None:
        relay = self.relay
        if relay is not None:
            relay.fail(error, fd)

    def _finish(self) -> None:
        """EOF read and every byte delivered: pass the EOF on (half-close)."""
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as error:
            if error.errno not in PEER_GONE_ERRNOS:
                self._fail(error, self.dst_fd)
                return
        relay = self.relay
        if relay is not None:
            if relay.ended_by < 0:  # the first EOF passed on
                relay.ended_by = self.src_fd
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
