"""Readiness of a worker's connection sockets: one epoll of our own, nested in uvloop.

uvloop gives every fd it watches a poll handle of its own: interest in a new fd allocates
a handle and costs several epoll_ctl calls and an ioctl, and dropping the last interest
closes the handle with more. A relayed connection does that for both its sockets, and
connection churn was dominated by it. Here a socket costs one epoll_ctl ADD when first
watched and nothing when it goes: `forget` drops our record and the close that follows
removes it from the epoll. The uvloop loop sees a single fd, this epoll, readable while
any connection socket is ready, and still runs timers, signals and name resolution.

Level-triggered, like the loop's own add_reader/add_writer, whose signatures these
methods share. Never closes the fds it watches.

An exception raised by a callback does not leave the dispatch: it goes to `on_error(fd,
exception)`, whose owner releases the connection that fd belongs to, and the batch goes on
with the other fds. Afterwards the fd is no longer watched, whether or not `on_error` made
it so: a callback that raised is not run again for it (a readable fd whose reader always
raises would otherwise be dispatched at full speed for ever). Without `on_error` the
exception propagates, as from the loop's own add_reader.
"""

import select
from collections.abc import Callable
from typing import Protocol

# EPOLLRDHUP with the read interest: a wakeup also tells whether the peer has sent its
# FIN, so a reader can take the data and the EOF behind it in one go (`peer_closed`).
_IN = select.EPOLLIN | select.EPOLLRDHUP
_RDHUP = select.EPOLLRDHUP
_OUT = select.EPOLLOUT
# An error or hang-up wakes whichever side is registered, as it does in libuv.
_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
MAX_EVENTS = 256  # per wakeup; the loop calls again at once while more are ready
_READER = 1  # index of the reader in a watch; the writer is at 2, the mask at 0
_WRITER = 2

Callback = Callable[[], None]
OnError = Callable[[int, Exception], None]


class Loop(Protocol):
    """The part of an asyncio loop a Poller needs (uvloop's in production)."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> object: ...
    def remove_reader(self, fd: int) -> object: ...


class Readiness(Protocol):
    """Where a relay or a connect attempt registers interest in its sockets (a `Poller`)."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> object: ...
    def remove_reader(self, fd: int) -> object: ...
    def add_writer(self, fd: int, callback: Callable[[], None]) -> object: ...
    def remove_writer(self, fd: int) -> object: ...
    def forget(self, fd: int) -> object: ...

    @property
    def peer_closed(self) -> int: ...


class Poller:
    """add_reader/add_writer for connection sockets; dispatches their events itself."""

    __slots__ = (
        "_epoll",
        "_watches",
        "_gone",
        "_loop",
        "peer_closed",
        "on_error",
        "after_dispatch",
    )

    def __init__(self, loop: Loop, on_error: OnError | None = None) -> None:
        self._epoll = select.epoll()
        # fd -> [event mask, reader or None, writer or None]
        self._watches: dict[int, list] = {}
        # fds dropped while a batch of events is dispatched: a later event of the same
        # batch belongs to the closed socket, not to a new one that got the same number.
        self._gone: set[int] = set()
        self._loop = loop
        # While a reader runs: non-zero if its socket's peer has shut down writing, so
        # everything left to read ends in EOF. Zero outside the dispatch of an event.
        self.peer_closed = 0
        self.on_error = on_error  # where an exception raised by a callback goes
        # Run after each batch of callbacks: where work they deferred is settled
        # (datagram.py adds their counters to the slot and returns spare admissions).
        self.after_dispatch: Callback | None = None
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._add(fd, _IN, _READER, callback)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._add(fd, _OUT, _WRITER, callback)

    def remove_reader(self, fd: int) -> None:
        self._remove(fd, _IN, _READER)

    def remove_writer(self, fd: int) -> None:
        self._remove(fd, _OUT, _WRITER)

    def forget(self, fd: int) -> None:
        """Stop watching `fd` without a system call: the caller closes it next, which
        takes it out of the epoll (it must be the socket's only descriptor)."""
        if self._watches.pop(fd, None) is not None:
            self._gone.add(fd)

    def _add(self, fd: int, flag: int, index: int, callback: Callback) -> None:
        watch = self._watches.get(fd)
        if watch is None:
            watch = [flag, None, None]
            watch[index] = callback
            self._epoll.register(fd, flag)
            self._watches[fd] = watch
            return
        watch[index] = callback
        if not watch[0] & flag:
            watch[0] |= flag
            self._epoll.modify(fd, watch[0])

    def _remove(self, fd: int, flag: int, index: int) -> None:
        watch = self._watches.get(fd)
        if watch is None or watch[index] is None:
            return
        watch[index] = None
        mask = watch[0] = watch[0] & ~flag
        if mask:
            self._epoll.modify(fd, mask)
        else:
            # Not left registered with no interest: a hang-up would still be reported.
            del self._watches[fd]
            self._gone.add(fd)
            self._epoll.unregister(fd)

    def _dispatch(self) -> None:
        """The loop's reader callback for our epoll: run what is ready now."""
        watches = self._watches
        gone = self._gone
        gone.clear()
        for fd, events in self._epoll.poll(0, MAX_EVENTS):
            if fd in gone:
                continue
            watch = watches.get(fd)
            if watch is None:
                continue
            try:  # free until a callback raises (3.11+), as the try/finally it replaced
                if events & _READ_EVENTS:
                    reader = watch[1]
                    if reader is not None:
                        self.peer_closed = events & _RDHUP
                        reader()
                        self.peer_closed = 0
                        if fd in gone:  # the reader closed it
                            continue
                if events & _WRITE_EVENTS:
                    writer = watch[2]  # None if the reader just dropped it
                    if writer is not None:
                        writer()
            except Exception as error:
                self.peer_closed = 0
                self._on_callback_error(fd, error)
        after = self.after_dispatch
        if after is not None:
            after()

    def _on_callback_error(self, fd: int, error: Exception) -> None:
        on_error = self.on_error
        if on_error is None:
            raise error
        try:
            on_error(fd, error)
        finally:
            if self._watches.pop(fd, None) is not None:  # its owner did not drop it
                self._gone.add(fd)
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass  # closed already: the close took it out of the epoll

    def watching(self) -> int:
        """How many fds are watched (for tests and leak checks)."""
        return len(self._watches)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._watches.clear()
        self._epoll.close()
