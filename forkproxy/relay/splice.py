"""One relayed connection: two spliced directions, half-close, teardown, byte counts.

Bytes go socket -> pipe -> socket with splice(2) and never enter Python, but for the
bytes at a TCP urgent mark, where splice cannot go on (`_read_urgent_inline`). Each
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

EOF from a source is passed on as shutdown(SHUT_WR) of the destination once the pipe has
drained, and the other direction keeps going until it ends too. A reset or error on
either side closes both. With --idle-timeout the directions are `IdleDirection`s, which
flag the relay `active` on every read for the worker's sweep to see; without it nothing
is done per event for it. Never accepts, admits or logs above debug. Closing breaks
every reference cycle of a connection, so its objects are freed at once by reference
counting, not by the cyclic garbage collector.
"""

import errno
import fcntl
import os
import socket
from collections.abc import Callable
from typing import Protocol

from forkproxy.errors import ForkproxyError
from forkproxy.settings.options import format_size

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_splice = os.splice
READS_PER_WAKEUP = 4  # full pipes a direction moves per readable event, at most
_SIOCATMARK = 0x8905  # ioctl: at the TCP urgent mark? (linux/sockios.h)
_INT_ZERO = bytes(4)
_URGENT_READ = 4096  # bytes read through Python at an urgent mark, at most
# One item per read; true for the first, the one the readiness event was about.
_READ_ROUNDS = (True,) + (False,) * (READS_PER_WAKEUP - 1)

# How a connection normally dies: the peer went away. Anything else gets a warning.
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


def _at_urgent_mark(fd: int) -> bool:
    """Whether the next byte to read from the TCP socket `fd` is urgent data (SIOCATMARK)."""
    try:
        return fcntl.ioctl(fd, _SIOCATMARK, _INT_ZERO) != _INT_ZERO
    except OSError:
        return False  # not a TCP socket: it has no urgent data


def _read_urgent_inline(src: socket.socket, pipe_fd: int, room: int) -> int:
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


class Pipe:
    """A kernel pipe used as a splice buffer; owned by the pool or by one direction."""

    __slots__ = ("read_fd", "write_fd", "capacity")

    def __init__(self, read_fd: int, write_fd: int, capacity: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.capacity = capacity

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class PipePool:
    """A worker's empty pipes, created lazily and reused across connections.

    Only empty pipes come back (`release`); a pipe that still holds bytes when its
    connection dies is closed (`discard`), so no byte can leak into another connection.
    """

    __slots__ = ("_free", "_size", "_keep")

    def __init__(self, size: int, keep: int) -> None:
        self._free: list[Pipe] = []
        self._size = size
        self._keep = keep

    def acquire(self) -> Pipe:
        if self._free:
            return self._free.pop()
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._size:
            try:
                fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, self._size)
            except OSError:
                pass  # over /proc/sys/fs/pipe-user-pages-soft: keep the default size
        return Pipe(read_fd, write_fd, fcntl.fcntl(read_fd, fcntl.F_GETPIPE_SZ))

    def release(self, pipe: Pipe) -> None:
        # A pipe the kernel made smaller (the per-user pipe limit was reached) is not
        # kept: the next one may get the full size once the user's pipes are fewer.
        if len(self._free) < self._keep and pipe.capacity >= self._size:
            self._free.append(pipe)
        else:
            pipe.close()

    def close(self) -> None:
        while self._free:
            self._free.pop().close()


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
                if not first or not _at_urgent_mark(self.src_fd):
                    self._return_pipe()
                    return
                try:
                    count = _read_urgent_inline(self.src, pipe.write_fd, room)
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
    `on_close(relay)` so the worker can release the connection's admission.
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
    ) -> None:
        self.io = io
        self.pool = pool
        self.client = client
        self.target = target
        self.on_close = on_close
        self.closed = False
        self.token = -1  # the admission this connection holds; set by the worker
        self.started = 0.0  # when the client was accepted; set by the worker
        self.peer: object = None  # the client's address, for logs; set by the worker
        self.error: OSError | None = None  # what ended the connection, if not a clean EOF
        # --idle-timeout: an IdleDirection sets `active` on a read; the worker's sweep
        # clears it and keeps `quiet_since`, when it last found the relay inactive.
        self.active = False
        self.quiet_since = 0.0
        self.client_to_target = direction(self, client, target, counters, to_target_field)
        self.target_to_client = direction(self, target, client, counters, to_client_field)

    def start(self) -> None:
        self.client_to_target.start()
        self.target_to_client.start()

    def on_direction_done(self) -> None:
        if self.client_to_target.done and self.target_to_client.done:
            self.close()

    def fail(self, error: OSError) -> None:
        """An error on either side ends the whole connection; `on_close` sees it."""
        if self.error is None:
            self.error = error
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        io = self.io
        client = self.client
        target = self.target
        io.forget(client.fileno())
        io.forget(target.fileno())
        self.client_to_target.stop()
        self.target_to_client.stop()
        client.close()
        target.close()
        self.on_close(self)


class Readiness(Protocol):
    """Where a relay registers interest in its sockets (a `poller.Poller`)."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> object: ...
    def remove_reader(self, fd: int) -> object: ...
    def add_writer(self, fd: int, callback: Callable[[], None]) -> object: ...
    def remove_writer(self, fd: int) -> object: ...
    def forget(self, fd: int) -> object: ...

    @property
    def peer_closed(self) -> int: ...


def check_pipe_size(size: int) -> None:
    """ForkproxyError if this process cannot make pipes of `size` bytes (--pipe-size)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, size)
    except OSError as error:
        raise ForkproxyError(
            f"cannot make pipes of --pipe-size={format_size(size)}: {error.strerror} (without "
            "CAP_SYS_RESOURCE the most is /proc/sys/fs/pipe-max-size)"
        ) from None
    finally:
        os.close(read_fd)
        os.close(write_fd)
