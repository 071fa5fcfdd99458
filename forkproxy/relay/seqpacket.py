"""One sequential-packet connection (SOCK_SEQPACKET): each message relayed whole.

A `MessageRelay` is a `Relay` (splice.py) whose two directions are `MessageDirection`s:
splice(2) would merge messages, so each one is read into the worker's message buffer
(messages.py) with recv(2) and sent on with one send(2), one message in, one message
out, boundaries kept. The rest is the stream relay's: backpressure (while the
destination cannot take a message, the one read is held and its source is not read
again), half-close (the source's end is passed on as shutdown(SHUT_WR) once the held
message is sent, and the other direction goes on), an error on either side closing both,
byte counts and the --idle-timeout flag. Never accepts, admits or logs.

A zero-length message and the end of the connection both read as 0 bytes: the end is
when the peer has shut down writing (POLLRDHUP) and nothing is left to read. A
zero-length message sent just before the shutdown, with nothing after it, cannot be told
from the end and is taken for it.
"""

import errno
import fcntl
import select
import socket
import struct
import termios
from collections.abc import Callable

from forkproxy.relay.messages import MessageBuffer, grow_send_buffer
from forkproxy.relay.splice import Direction, PipePool, Readiness, Relay

MESSAGES_PER_WAKEUP = 16  # messages a direction moves per readable event, at most
_MSG_TRUNC = socket.MSG_TRUNC
_ENDED = select.POLLRDHUP | select.POLLHUP
_INT = struct.Struct("i")


class MessageDirection(Direction):
    """Messages flowing from one socket of a `MessageRelay` to the other."""

    __slots__ = ("buffer", "view", "size", "held", "mark_active", "recv_into", "send")

    def __init__(
        self,
        relay: "Relay",
        src: socket.socket,
        dst: socket.socket,
        counters: memoryview,
        counter_field: int,
    ) -> None:
        Direction.__init__(self, relay, src, dst, counters, counter_field)
        assert isinstance(relay, MessageRelay)
        buffer = relay.buffer
        self.buffer = buffer.memory
        self.view = buffer.view
        self.size = buffer.size
        self.held: bytes | None = None  # a message the destination could not take yet
        self.mark_active = relay.mark_active  # --idle-timeout: flag the relay on reads
        self.recv_into = src.recv_into
        self.send = dst.send

    def _on_readable(self) -> None:
        relay = self.relay
        if relay is None:
            return
        if self.mark_active:
            relay.active = True
        for _ in range(MESSAGES_PER_WAKEUP):
            try:
                count = self.recv_into(self.buffer, 0, _MSG_TRUNC)
            except BlockingIOError:
                return
            except OSError as error:
                self._fail(error)
                return
            if count == 0 and _ended(self.src_fd):
                self.eof = True
                self._pause_reading()
                self._finish()  # may close the relay
                return
            if count > self.size:
                self._fail(OSError(errno.EMSGSIZE, f"a message larger than {self.size} bytes"))
                return
            if not self._send(self.view[:count]):
                return
            self.counters[self.counter_field] += count
            self.target_counters[self.target_field] += count

    def _send(self, message: memoryview | bytes) -> bool:
        """Send one message whole; False if it is held (backpressure) or the relay failed."""
        try:
            self.send(message)
            return True
        except BlockingIOError:
            pass
        except OSError as error:
            if error.errno != errno.EMSGSIZE or not grow_send_buffer(self.dst, len(message)):
                self._fail(error)
                return False
            try:  # our send buffer was smaller than the sender's: it takes it now
                self.send(message)
                return True
            except BlockingIOError:
                pass
            except OSError as again:
                self._fail(again)
                return False
        self.held = bytes(message)
        self._pause_reading()
        if not self.writing:
            self.writing = True
            self.io.add_writer(self.dst_fd, self.on_writable)  # type: ignore[arg-type]
        return False

    def _on_writable(self) -> None:
        held = self.held
        if held is None:  # a stale event after teardown began
            return
        try:
            self.send(held)
        except BlockingIOError:
            return
        except OSError as error:
            self._fail(error)
            return
        self.held = None
        self.counters[self.counter_field] += len(held)
        self.target_counters[self.target_field] += len(held)
        self.writing = False
        self.io.remove_writer(self.dst_fd)
        if not self.reading:
            self.reading = True
            self.io.add_reader(self.src_fd, self.on_readable)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.held = None
        Direction.stop(self)


class MessageRelay(Relay):
    """A connected client and target of sequential packets, relayed message by message."""

    __slots__ = ("buffer", "mark_active")

    def __init__(
        self,
        io: Readiness,
        pool: PipePool,
        buffer: MessageBuffer,
        client: socket.socket,
        target: socket.socket,
        counters: memoryview,
        to_target_field: int,
        to_client_field: int,
        on_close: Callable[[Relay], None],
        mark_active: bool = False,
        target_row: memoryview | None = None,
    ) -> None:
        self.buffer = buffer  # the worker's; the directions read into it
        self.mark_active = mark_active
        Relay.__init__(
            self,
            io,
            pool,
            client,
            target,
            counters,
            to_target_field,
            to_client_field,
            on_close,
            MessageDirection,
            target_row,
        )


def _ended(fd: int) -> bool:
    """After a read of 0 bytes: whether that was the end (the peer shut down writing and
    nothing is queued), not a zero-length message."""
    poll = select.poll()
    poll.register(fd, _ENDED)
    if not poll.poll(0):
        return False  # not shut down even now: it was an empty message
    try:
        queued = _INT.unpack(fcntl.ioctl(fd, termios.FIONREAD, bytes(_INT.size)))[0]
    except OSError:
        return True
    return queued == 0  # bytes still queued: it was an empty message before the end
