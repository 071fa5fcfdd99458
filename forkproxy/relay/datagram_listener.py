"""One datagram listener a worker reads: its clients' datagrams into their sessions.

`DatagramListener` reads the listening socket in batches (recvfrom_into the worker's
message buffer, MSG_TRUNC telling a datagram too large for it), finds the client's
`Session` by address in a dict, opens one for a new client (admission, per-source
unit, a socket to a target of the listener's group: datagram_session.py), and sends
the datagram on through it from the buffer. A target that cannot take a datagram now
gets it held (copied) while the listener is not read: backpressure. It ends sessions
(`end_session`) and hands each to its `DatagramRelay` (datagram.py) for the accounting.
Never logs itself: what it drops goes to `Drops` (datagram_drops.py).
"""

import _socket
import errno
import socket
from typing import TYPE_CHECKING

from forkproxy.relay.datagram_drops import Drops
from forkproxy.relay.datagram_session import (
    END_ERROR,
    PENDING_MAX,
    Session,
    is_refusal,
    open_session_socket,
)
from forkproxy.relay.messages import MessageBuffer, grow_send_buffer
from forkproxy.relay.targets import LOCAL_ERRNOS, TargetGroup
from forkproxy.settings.config import ListenerSettings
from forkproxy.shared.admission import ADMITTED, REFUSED_BUSY, REFUSED_CAP
from forkproxy.shared.layout import (
    DG_BYTES_TO_CLIENT,
    DG_BYTES_TO_TARGET,
    DG_TO_CLIENT,
    DG_TO_TARGET,
)
from forkproxy.shared.listener import Listener
from forkproxy.shared.per_source import source_key

if TYPE_CHECKING:
    from forkproxy.relay.datagram import DatagramRelay

READS_PER_WAKEUP = 64  # datagrams read from a listener per readable event, at most
_MSG_TRUNC = socket.MSG_TRUNC


class DatagramListener:
    """One datagram listener this worker reads, and the sessions of its clients."""

    __slots__ = (
        "relay",
        "listener",
        "take_unit",
        "add_reader",
        "forget",
        "direct",
        "family",
        "fd",
        "recvfrom_into",
        "reply",
        "group",
        "sessions",
        "buffer",
        "view",
        "size",
        "row",
        "drops",
        "source_limit",
        "replies_max",
        "timeout",
        "reading",
        "backpressure",
        "on_readable",
        "replied",
        "replied_bytes",
    )

    def __init__(
        self,
        relay: "DatagramRelay",
        listener: Listener,
        row: memoryview,
        group: TargetGroup,
        buffer: MessageBuffer,
        settings: ListenerSettings,
    ) -> None:
        self.relay = relay
        self.listener = listener
        self.take_unit = relay.take_unit
        self.add_reader = relay.poller.add_reader
        self.forget = relay.poller.forget
        # (family, sockaddr) of the group's one target when it is an address, not a name
        # to resolve: new sessions connect to it without the group's choice of target.
        target = group.targets[0]
        single = len(group.targets) == 1 and not target.needs_resolving
        self.direct = (target.family, target.sockaddr) if single else None
        sock = listener.sock
        self.family = sock.family
        self.fd = sock.fileno()
        self.recvfrom_into = sock.recvfrom_into
        self.reply = sock.sendto  # replies go to their client from the listening socket
        self.group = group
        self.sessions: dict[object, Session] = {}  # by client address
        self.buffer = buffer.memory
        self.view = buffer.view
        self.size = buffer.size
        self.row = row  # the listener's counters in the worker's slot
        self.drops = Drops(row)
        self.source_limit = settings.connections_max_per_source  # 0: no key to look up
        self.replies_max = settings.datagram_replies  # 0: never reached
        self.timeout = settings.datagram_timeout
        self.reading = False
        self.backpressure = Backpressure(self)
        self.on_readable = self._on_readable
        # Replies sent in the current batch of callbacks: added to the row after it.
        self.replied = 0
        self.replied_bytes = 0

    def start(self) -> None:
        if not self.reading and self.backpressure.session is None:
            self.reading = True
            self.relay.poller.add_reader(self.fd, self.on_readable)

    def stop(self) -> None:
        if self.reading:
            self.reading = False
            self.relay.poller.remove_reader(self.fd)

    # -- from clients --------------------------------------------------------------------

    def _on_readable(self) -> None:
        recvfrom_into = self.recvfrom_into
        buffer = self.buffer
        view = self.view
        size = self.size
        sessions = self.sessions
        sent = sent_bytes = 0  # added to the row once, after the batch
        try:
            for _ in range(READS_PER_WAKEUP):
                if not self.reading:  # a datagram is held: its target must take it first
                    return
                try:
                    count, client = recvfrom_into(buffer, 0, _MSG_TRUNC)
                except BlockingIOError:
                    return
                except InterruptedError:
                    continue
                except OSError as error:
                    self.drops.read_error(self.listener.label, error)
                    return
                if count > size:
                    self.drops.truncated(self.family, client, count, size)
                    continue
                session = sessions.get(client)
                if session is None:
                    session = self._open(client)
                    if session is None:
                        continue
                session.active = True
                send = session.send
                if send is None:  # its target's name is being resolved
                    self._keep_pending(session, view[:count])
                    continue
                try:
                    send(view[:count])
                except BlockingIOError:
                    self.backpressure.hold(session, bytes(view[:count]))
                    return
                except OSError as error:
                    self.on_send_error(session, view[:count], error)
                    continue
                session.bytes_to_target += count
                sent += 1
                sent_bytes += count
        finally:
            if sent:
                row = self.row
                row[DG_TO_TARGET] += sent
                row[DG_BYTES_TO_TARGET] += sent_bytes

    def _open(self, client: object) -> Session | None:
        """A session for a new client, or None (its datagram dropped and counted)."""
        relay = self.relay
        per_source = self.source_limit
        token = self.take_unit(source_key(self.family, client) if per_source else None, per_source)
        if token < ADMITTED:
            if token == REFUSED_CAP:
                self.drops.cap(self.family, client, relay.connections_max)
            elif token == REFUSED_BUSY:
                self.drops.busy(self.family, client)
            else:
                self.drops.per_source(self.family, client, per_source)
            return None
        session = Session(self, client, token)
        self.sessions[client] = session
        relay.session_opened(session, self.row)
        direct = self.direct
        if direct is None:
            self._connect(session)
            return None if session.closed else session
        try:
            sock = open_session_socket(*direct)
        except OSError as error:
            if error.errno not in LOCAL_ERRNOS:
                self.group.failed(0, error)
            self.no_session(session, error)
            return None
        session.attach(sock, 0)
        self.add_reader(session.fd, session.on_readable)
        return session

    def _connect(self, session: Session) -> None:
        """Open the session's socket to the first target of the group that takes it."""
        group = self.group
        targets = group.targets
        error: OSError | None = None
        for index in group.order() if len(targets) > 1 else (0,):
            target = targets[index]
            if target.needs_resolving:
                session.pending = []
                self.relay.resolve(self, session, index)
                return
            try:
                sock = open_session_socket(target.family, target.sockaddr)
            except OSError as failure:
                error = failure
                if failure.errno in LOCAL_ERRNOS:
                    break
                group.failed(index, failure)
                continue
            self.attach(session, sock, index)
            return
        assert error is not None
        self.no_session(session, error)

    def attach(self, session: Session, sock: _socket.socket, index: int) -> None:
        """`session`'s socket is connected: watch it, and send what it held meanwhile."""
        session.attach(sock, index)
        self.add_reader(session.fd, session.on_readable)
        pending = session.pending
        session.pending = None
        for datagram in pending or ():
            try:
                sock.send(datagram)
            except OSError as error:
                self.on_send_error(session, memoryview(datagram), error)
                if session.closed:
                    return
                continue
            self.sent(session, len(datagram))

    def flush_replies(self) -> None:
        row = self.row
        row[DG_TO_CLIENT] += self.replied
        row[DG_BYTES_TO_CLIENT] += self.replied_bytes
        self.replied = self.replied_bytes = 0

    def sent(self, session: Session, count: int) -> None:
        session.bytes_to_target += count
        row = self.row
        row[DG_TO_TARGET] += 1
        row[DG_BYTES_TO_TARGET] += count

    def no_session(self, session: Session, error: OSError) -> None:
        """No socket to any target could be opened: drop what the session holds."""
        count = 1 + len(session.pending or ())
        self.drops.no_session(self.family, session.client, self.group.label, error, count)
        self.end_session(session, END_ERROR)

    def _keep_pending(self, session: Session, datagram: memoryview) -> None:
        pending = session.pending
        if pending is not None and len(pending) < PENDING_MAX:
            pending.append(bytes(datagram))
        else:
            self.drops.pending()

    # -- backpressure and errors towards the target ------------------------------------------

    def on_send_error(self, session: Session, datagram: memoryview, error: OSError) -> None:
        """The kernel would not send a datagram of `session` to its target."""
        sock = session.sock
        # EMSGSIZE from a unix target: our send buffer may be smaller than the client's.
        if error.errno == errno.EMSGSIZE and sock is not None and self._resend(sock, datagram):
            self.sent(session, len(datagram))
            return
        self.drops.to_target(self.family, session.client, _target_text(self.group, session), error)
        if is_refusal(error):
            self._target_refused(session, error)

    def _resend(self, sock: _socket.socket, datagram: memoryview) -> bool:
        if sock.family != socket.AF_UNIX or not grow_send_buffer(sock, len(datagram)):
            return False
        try:
            sock.send(datagram)
        except OSError:
            return False
        return True

    def on_session_error(self, session: Session, error: OSError) -> None:
        """Reading a session's socket failed: ECONNREFUSED is an earlier datagram the
        target's host refused (an ICMP port unreachable); anything else ends it too."""
        self.drops.refused(self.family, session.client, _target_text(self.group, session), error)
        self._target_refused(session, error)

    def _target_refused(self, session: Session, error: OSError) -> None:
        """End the session, so the client's next datagram opens a new one, on another
        target if the group has several (this one cools down)."""
        index = session.target_index
        if index >= 0 and is_refusal(error):
            self.group.failed(index, error)
            target = self.group.targets[index]
            if target.needs_resolving:
                self.relay.address_refused(target)
        self.end_session(session, END_ERROR)

    # -- the end ---------------------------------------------------------------------------

    def end_session(self, session: Session, reason: str) -> None:
        """Close `session`'s socket and hand it to the relay; `reason`: why (END_*)."""
        if session.closed:
            return
        session.closed = True
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]
        if self.backpressure.session is session:
            self.drops.held()  # the datagram it held goes nowhere now
            self.backpressure.release()
        sock = session.sock
        if sock is not None:
            self.forget(session.fd)  # the close takes it out of the epoll
            sock.close()
        session.owner = None
        session.send = None
        self.relay.session_ended(self, session, reason)


def _target_text(group: TargetGroup, session: Session) -> str:
    """The target a session is connected to, else every target it may get."""
    index = session.target_index
    return f"'{group.targets[index].text}'" if index >= 0 else group.label


class Backpressure:
    """A datagram of one listener that its session's target could not take yet (a unix
    datagram target's queue is full): held, copied, while the listener is not read, and
    sent when the session's socket is writable. As the kernel makes a unix datagram
    sender wait, and no datagram is dropped for it."""

    __slots__ = ("listener", "session", "datagram")

    def __init__(self, listener: DatagramListener) -> None:
        self.listener = listener
        self.session: Session | None = None  # whose datagram waits for its target
        self.datagram = b""

    def hold(self, session: Session, datagram: bytes) -> None:
        self.session = session
        self.datagram = datagram
        self.listener.stop()
        self.listener.relay.poller.add_writer(session.fd, session.on_writable)

    def on_writable(self, session: Session) -> None:
        """The session's socket can take a datagram: send the held one, read again."""
        datagram = self.datagram
        if self.session is not session or session.send is None:
            return
        try:
            session.send(datagram)
        except BlockingIOError:
            return
        except OSError as error:
            self.release()
            self.listener.on_send_error(session, memoryview(datagram), error)
            return
        self.listener.sent(session, len(datagram))
        self.release()

    def release(self) -> None:
        session = self.session
        if session is not None:
            self.session = None
            self.datagram = b""
            listener = self.listener
            if not session.closed:
                listener.relay.poller.remove_writer(session.fd)
            if not listener.relay.draining:
                listener.start()
