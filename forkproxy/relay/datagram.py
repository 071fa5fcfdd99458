"""A worker's datagram listeners (UDP, unix datagram): sessions by client address.

`DatagramRelay` holds the datagram listeners a worker reads (a `DatagramListener`
each: datagram_listener.py), the --datagram-timeout sweep over their sessions, host-name
resolution for session sockets, and the accounting of sessions.

A datagram from a client address this worker has no session for opens one: it takes a
unit of the connection cap and of its source's cap, like a connection (over either, the
datagram is dropped and counted: there is nothing to refuse), and a socket of its own
connected to a target of the listener's route (datagram_session.py). That datagram and
every later one from the client go out through it, whole; what the target sends back
goes to the client from the listening socket. Sessions are found by client address in a
dict per listener. A session ends after --datagram-timeout without a datagram either
way, after --datagram-replies replies, when its target refuses (an ICMP error), or at
the worker's graceful timeout; `DatagramRelay.session_ended` is where each ends, with
its reason.

Only one worker reads a datagram listener (supervisor/ranks.py): all of a client's
datagrams reach the process that holds its session. A datagram is read into the worker's
message buffer (messages.py) and sent from it at once: nothing is allocated per datagram
but what Python's socket calls make. When a target cannot take a datagram now (a unix
target's queue is full), it is held and the listener is not read until the target takes
it: backpressure, as the kernel gives a unix datagram sender. A datagram the kernel
refuses to send (ECONNREFUSED from an ICMP error, EMSGSIZE, ENOBUFS) is counted and
dropped (datagram_drops.py); nothing here ends the worker. Never accepts, and never
logs above warning.
"""

import logging
import math
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from forkproxy import logs
from forkproxy.relay.datagram_drops import client_text
from forkproxy.relay.datagram_listener import DatagramListener
from forkproxy.relay.datagram_session import (
    END_REPLIES,
    END_STOPPED,
    END_TIMEOUT,
    Session,
    open_session_socket,
)
from forkproxy.relay.messages import MessageBuffer
from forkproxy.relay.targets import COOLDOWN, TargetGroup
from forkproxy.relay.timeouts import LazySweep, sweep_interval
from forkproxy.settings.address import TargetAddress
from forkproxy.shared.admission import ADMITTED
from forkproxy.shared.layout import DG_SESSIONS, DG_SESSIONS_ACTIVE, LAST_ACTIVITY_NS
from forkproxy.shared.listener import Listener

if TYPE_CHECKING:
    from forkproxy.relay.worker import Worker

log = logging.getLogger("forkproxy")


class DatagramRelay:
    """The datagram listeners a worker reads, their sessions, and their timeout sweep."""

    def __init__(
        self,
        worker: "Worker",
        listeners: Sequence[tuple[Listener, memoryview]],
        buffer: MessageBuffer,
    ) -> None:
        """`listeners`: the datagram listeners this worker reads, each with its row of
        counters in the worker's slot."""
        config = worker.config
        self.worker = worker  # told when the last session of a draining worker ends
        self.loop = worker.loop
        self.poller = worker.poller
        self.slot = worker.slot
        admitter = worker.admitter
        self.admit = admitter.admit
        self.release = admitter.release
        self.debug = log.isEnabledFor(logging.DEBUG)  # the level is set once, at start
        # Admissions of sessions that ended by --datagram-replies in this batch of
        # callbacks, not yet given back: a session opened in the same batch takes one
        # without the admission lock. All go back when the batch ends (`after_dispatch`).
        self.spare_units = 0
        self.connections_max = config.connections_max
        self.draining = False
        self.sessions: set[Session] = set()  # open, of every listener: what the sweep watches
        self.target_failures = logs.RateLimitedLog(log, logging.WARNING)
        # Each listener's settings (its [listeners.NAME] section or --route, else the
        # global ones); listeners with the same targets share a group, and so its
        # round-robin and cool-down.
        groups: dict[tuple[TargetAddress, ...], TargetGroup] = {}
        self.listeners = []
        for listener, row in listeners:
            settings = config.settings_for(listener.name)
            group = groups.get(settings.targets)
            if group is None:
                group = groups[settings.targets] = TargetGroup(
                    settings.targets, on_target_failed=self._on_target_failed
                )
            self.listeners.append(DatagramListener(self, listener, row, group, buffer, settings))
        self.poller.after_dispatch = self.after_dispatch
        timeouts = [listener.timeout for listener in self.listeners]
        self.linger = math.inf  # draining: how long a quiet session is kept at most
        self.address_turns: dict[TargetAddress, int] = {}  # host-name targets, see _resolve
        self.sweep: LazySweep | None = None
        if min(timeouts, default=math.inf) != math.inf:
            interval = sweep_interval(min(timeouts))
            self.sweep = LazySweep(self.loop, interval, self.sessions, self._sweep)

    def __len__(self) -> int:
        """Sessions open."""
        return len(self.sessions)

    def _on_target_failed(self, target: TargetAddress, error: OSError, newly: bool) -> None:
        if newly:
            self.target_failures.log(
                "datagram target '%s' refused: %s; new sessions go to the other targets, "
                "and to it only after them for %gs",
                target.text,
                error.strerror or error,
                COOLDOWN,
            )

    def start(self) -> None:
        for listener in self.listeners:
            listener.start()

    def stop_reading(self) -> None:
        """The worker drains: read no more datagrams. Its sessions only wait for late
        replies now (their clients' next datagrams go to the workers that read the
        listeners): each ends once quiet for one sweep interval, an eighth of the
        shortest --datagram-timeout, or at the graceful timeout."""
        self.draining = True
        for listener in self.listeners:
            listener.stop()
        if self.sweep is not None:
            self.linger = self.sweep.interval
            if self.sessions and not self.sweep.armed:
                self.sweep.arm()

    def close_all(self) -> None:
        """The graceful timeout: end every session."""
        for session in list(self.sessions):
            owner = session.owner
            if owner is not None:
                owner.end_session(session, END_STOPPED)

    def after_dispatch(self) -> None:
        """A batch of readiness callbacks has run: add the replies they counted to the
        slot, and give back the spare admissions."""
        for listener in self.listeners:
            if listener.replied:
                listener.flush_replies()
        spare = self.spare_units
        if spare:
            self.spare_units = 0
            release = self.release
            for _ in range(spare):
                release(ADMITTED)

    def take_unit(self, key: bytes | None, limit: int) -> int:
        """A new session's admission (`Admitter.admit`): a spare unit when it needs no
        per-source row, else from the admitter."""
        if self.spare_units and key is None:
            self.spare_units -= 1
            return ADMITTED
        return self.admit(key, limit)

    def session_opened(self, session: Session, row: memoryview) -> None:
        row[DG_SESSIONS] += 1
        row[DG_SESSIONS_ACTIVE] += 1
        self.sessions.add(session)
        sweep = self.sweep
        if sweep is not None and not sweep.armed:
            sweep.arm()

    def session_ended(self, listener: DatagramListener, session: Session, reason: str) -> None:
        """Where every session ends, once: its units go back, and `reason` (END_*) is
        known here, with its client, listener and byte counts (the access log's hook)."""
        sessions = self.sessions
        sessions.discard(session)
        listener.row[DG_SESSIONS_ACTIVE] -= 1
        if not sessions:  # what --exit-idle-time counts from; only read while none is open
            self.slot[LAST_ACTIVITY_NS] = time.monotonic_ns()
        # Its socket is closed (`end_session` closed it): its unit can go back. One of a
        # session ended by its replies is kept for the rest of the batch, when the
        # callbacks run from the poller (`after_dispatch` returns it).
        if reason == END_REPLIES and session.token == ADMITTED and not self.draining:
            self.spare_units += 1
        else:
            self.release(session.token)
        if self.debug:
            log.debug(
                "datagram session of %s on %s ended (%s): %d bytes in, %d bytes out",
                client_text(listener.family, session.client),
                listener.listener.label,
                reason,
                session.bytes_to_target,
                session.bytes_to_client,
            )
        if self.draining and not self.sessions:
            self.worker.on_drained_part()

    def resolve(self, listener: DatagramListener, session: Session, index: int) -> None:
        """Resolve target `index` of `listener`'s group for `session`, off the loop."""
        self.loop.create_task(self._resolve(listener, session, index))

    async def _resolve(self, listener: DatagramListener, session: Session, index: int) -> None:
        target = listener.group.targets[index]
        error: OSError
        try:
            infos = await self.loop.getaddrinfo(target.host, target.port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as failure:
            error = OSError(failure.args[0] if failure.args else 0, str(failure))
            infos = []
        else:
            error = OSError(0, "no address")
        if session.closed:
            return
        # UDP connect(2) succeeds whatever is there: a host name's addresses are taken in
        # turn from the one after the last that was refused (`address_refused`).
        turn = self.address_turns.get(target, 0) % max(1, len(infos))
        for family, _, _, _, sockaddr in infos[turn:] + infos[:turn]:
            try:
                sock = open_session_socket(family, sockaddr)
            except OSError as failure:
                error = failure
                continue
            listener.attach(session, sock, index)
            return
        listener.group.failed(index, error)
        listener.no_session(session, error)

    def address_refused(self, target: TargetAddress) -> None:
        """The address a host-name target resolved to refused: the next session of that
        target tries the next one (IPv4 after IPv6 for localhost, say)."""
        self.address_turns[target] = self.address_turns.get(target, 0) + 1

    def _sweep(self, now: float) -> None:
        """End sessions without a datagram either way for their listener's
        --datagram-timeout (met late by up to two sweep intervals of the shortest one, as
        --idle-timeout is: timeouts.sweep_idle)."""
        for session in list(self.sessions):
            if session.active:
                session.active = False
                session.quiet_since = now
                continue
            owner = session.owner
            if owner is not None and now - session.quiet_since >= min(owner.timeout, self.linger):
                owner.end_session(session, END_TIMEOUT)
