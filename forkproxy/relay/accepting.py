"""A worker's accepting: bounded accept batches, admission, refusal, queue mode.

`Acceptor` takes clients off the listeners a worker inherited, in batches of
ACCEPT_BATCH per wakeup, admits each under the global and the per-source caps (its
`Admitter`, shared/admission.py), or refuses it (accepted and closed at once, nothing
sent to a target: refusals.py), and hands an admitted client to the worker's
`Connector`. Accepting pauses while descriptors run short, so a flood of clients waits
in the listen backlog instead of taking the pipes of connections already relaying. With
--on-limit=queue it holds the one client that met the cap and stops accepting until
capacity comes back (capacity_wait.py). In either mode it holds, the same way, a client
that met the admission mutex busy (its holder preempted past LOCK_BUDGET, on a loaded
host) and tries again every BUSY_RETRY_INTERVAL: refused, that client would be closed
with its request unread, an RST for our own contention and not for a cap.
Never connects, relays or blocks.

An exception while one client is taken in (admission, its socket object, holding it)
closes it, gives back its admission if it holds one and counts it refused, with one
warning (internal_error.py); the batch goes on with the next client.
"""

import errno
import logging
import os
import resource
import socket
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING

from forkproxy import logs
from forkproxy.relay.capacity_wait import CapacityWaiter
from forkproxy.relay.failpoints import Failpoint
from forkproxy.relay.refusals import REFUSAL_WORDS, Refusals
from forkproxy.relay.splice import NO_TOKEN
from forkproxy.relay.target_connect import set_socket_options
from forkproxy.settings.address import format_sockaddr
from forkproxy.settings.options import ON_LIMIT_QUEUE
from forkproxy.shared.admission import ADMITTED, REFUSED_BUSY, REFUSED_CAP
from forkproxy.shared.layout import L_CONNECTIONS
from forkproxy.shared.listener import Listener
from forkproxy.shared.per_source import source_key
from forkproxy.shared.scoreboard import ACCEPTED, ACTIVE, REFUSED

if TYPE_CHECKING:
    from forkproxy.relay.plans import ListenerPlan
    from forkproxy.relay.worker import Worker

log = logging.getLogger("forkproxy")

ACCEPT_BATCH = 32  # accepts per wakeup: bounded, so one busy listener cannot starve the rest
ACCEPT_PAUSE = 0.5  # seconds to stop accepting after running out of descriptors
# Seconds between admission attempts for a client held for a busy mutex: the loop serves
# its connections in between (each attempt may sleep up to LOCK_BUDGET on the mutex).
BUSY_RETRY_INTERVAL = 0.01
# Descriptors kept free for the pipes of open connections. Accepting pauses once new
# clients would leave fewer (at most a quarter of those free at start), so a flood of
# clients cannot take the pipes connections already relaying need, and waits in the backlog.
FD_HEADROOM = 32


class _Held:
    """The client a worker holds while it waits for capacity (queue mode) or for the
    admission mutex."""

    __slots__ = ("fd", "peer", "plan", "key", "waiting")

    def __init__(self, fd: int, peer: object, plan: "ListenerPlan", key: bytes | None) -> None:
        self.fd = fd
        self.peer = peer
        self.plan = plan
        self.key = key  # its source, for the per-source limit
        self.waiting = False  # counted among the admission's waiters (until wait_end)


class Acceptor:
    """Takes a worker's clients off its listeners and admits or refuses each."""

    def __init__(
        self,
        worker: "Worker",
        plans: Mapping[int, "ListenerPlan"],
        failpoint: Failpoint | None = None,
    ) -> None:
        self.worker = worker  # draining or not
        self.config = worker.config
        self.loop = worker.loop
        self.poller = worker.poller
        self.listeners = worker.listeners
        self.admitter = worker.admitter
        self.slot = worker.slot
        self.events_fd = worker.spec.events_fd  # any descriptor of ours, to probe the lowest free
        self.connect = worker.connector.connect
        self.internal_errors = worker.connector.internal_errors
        self.failpoint = failpoint  # tests only (failpoints.py); None otherwise
        self.accepting = False
        self.refusals = Refusals(worker.slot, self.admitter, self.config, self.internal_errors)
        # Also the connector's, when a connect found no free descriptor and pauses us.
        self.failures = logs.RateLimitedLog(log, logging.WARNING)
        self.accept_callbacks = {
            listener.fd: partial(self.on_listener_readable, listener) for listener in self.listeners
        }
        self.plans = plans  # by listener fd: its family, options, per-source limit, route
        self.queue_on_limit = self.config.on_limit == ON_LIMIT_QUEUE
        self.held: _Held | None = None  # queue mode: the client waiting for capacity
        self.waiter: CapacityWaiter | None = None  # queue: started when first needed
        self.fd_ceiling = _fd_ceiling(self.events_fd)

    def start(self) -> None:
        # In the worker's poller too: a wakeup that finds new clients and ready
        # connections serves both in one dispatch.
        self.accepting = True
        for listener in self.listeners:
            self.poller.add_reader(listener.fd, self.accept_callbacks[listener.fd])

    def stop(self) -> None:
        if self.accepting:
            self.accepting = False
            for listener in self.listeners:
                self.poller.remove_reader(listener.fd)

    def close(self) -> None:
        """The worker drains: accept no more, and close our copies of the listeners."""
        self.stop()
        for listener in self.listeners:
            listener.sock.close()  # our copy only: the master and systemd keep theirs

    def on_listener_readable(self, listener: Listener) -> None:
        accept = listener.sock._accept  # type: ignore[attr-defined]  # fd, no socket object
        family = listener.sock.family
        plan = self.plans[listener.fd]
        admit = self.admitter.admit
        source_limit = plan.source_limit  # 0: no key to look up
        for _ in range(ACCEPT_BATCH):
            if not self.accepting:  # paused by the client before: short of descriptors
                return
            try:
                fd, peer = accept()
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as error:
                self._on_accept_error(error, listener)
                return
            token = NO_TOKEN
            key = None
            try:
                if fd >= self.fd_ceiling:
                    # The kernel gives the lowest free descriptor: all below this one are
                    # taken. Serve this client from the headroom; the next ones wait in the
                    # backlog.
                    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                    self.failures.log(
                        "fewer than %d file descriptors left (RLIMIT_NOFILE %d): pausing "
                        "accepts for %gs to keep them for open connections",
                        limit - self.fd_ceiling,
                        limit,
                        ACCEPT_PAUSE,
                    )
                    self.pause()
                key = source_key(family, peer) if source_limit else None
                token = admit(key, source_limit)
            except Exception as error:
                self.refusals.drop(fd, None, token, family, peer, error)
                continue
            if token >= ADMITTED:
                self._admit(fd, peer, plan, token)
            elif token == REFUSED_CAP and self.queue_on_limit:
                self._hold(_Held(fd, peer, plan, key))
                return
            elif token == REFUSED_BUSY:  # no cap turned it away: hold it, try again
                self.held = _Held(fd, peer, plan, key)
                self.stop()
                self.loop.call_later(BUSY_RETRY_INTERVAL, self.on_capacity)
                return
            else:
                self.refusals.refuse(fd, family, peer, token, source_limit, plan.counters)

    def _admit(self, fd: int, peer: object, plan: "ListenerPlan", token: int) -> None:
        """An admitted client: connect it to a target (`token` goes back to the admitter).
        Never raises: the connector owns the client from `connect` on, and before that a
        failure releases it here."""
        client = None
        try:
            client = socket.socket(plan.family, plan.kind, 0, fd)
            client.setblocking(False)
            failpoint = self.failpoint
            if failpoint is not None and failpoint.due("accept"):
                raise failpoint.fault()
        except Exception as error:
            self.refusals.drop(fd, client, token, plan.family, peer, error)
            return
        slot = self.slot
        slot[ACCEPTED] += 1
        slot[ACTIVE] += 1
        plan.counters[L_CONNECTIONS] += 1
        if plan.client_options:
            try:
                set_socket_options(client, plan.client_options)
            except OSError:
                pass  # the client is gone already: its relay will find out
        self.connect(client, token, peer, plan.route, plan.counters)

    # -- --on-limit=queue ----------------------------------------------------------------

    def _hold(self, held: "_Held") -> None:
        """At the cap in queue mode: keep this client, stop accepting so the next ones wait
        in the listen backlog, and wait for capacity (why a thread: capacity_wait.py)."""
        if self.held is not None:  # not reached: accepting stops while a client is held
            self.slot[REFUSED] += 1
            held.plan.counters[REFUSAL_WORDS[REFUSED_CAP]] += 1
            os.close(held.fd)
            return
        self.held = held
        try:
            self.stop()
            if self.waiter is None:
                self.waiter = CapacityWaiter(
                    self.admitter.admission.seq_address, self.loop, self.on_capacity
                )
            self.admitter.wait_begin()
            held.waiting = True
        except Exception as error:  # no thread to wait with, say: refuse it, go on
            self._give_up_held(error)
            return
        self.on_capacity()  # once more, now counted as a waiter: no release is missed

    def on_capacity(self) -> None:
        """Capacity (or the mutex) may have come back: try to admit the held client, else
        wait again. Never raises: after an internal error the held client is refused."""
        held = self.held
        if held is None:  # closed by the graceful timeout meanwhile
            return
        admitter = self.admitter
        try:
            seq = admitter.capacity_seq()  # before the attempt: a release after it changes seq
            token = admitter.admit(held.key, held.plan.source_limit)
            if held.waiting and token in (REFUSED_CAP, REFUSED_BUSY):
                assert self.waiter is not None
                self.waiter.wait(seq)
                return
            if token == REFUSED_BUSY:  # held for the mutex, in either mode
                self.loop.call_later(BUSY_RETRY_INTERVAL, self.on_capacity)
                return
        except Exception as error:
            self._give_up_held(error)
            return
        self.held = None
        if held.waiting:
            held.waiting = False
            admitter.wait_end()
        elif token == REFUSED_CAP and self.queue_on_limit:  # held for the mutex, now at the cap
            self._hold(held)
            return
        if token >= ADMITTED:
            self._admit(held.fd, held.peer, held.plan, token)
        else:
            plan = held.plan
            self.refusals.refuse(
                held.fd, plan.family, held.peer, token, plan.source_limit, plan.counters
            )
        if not self.worker.draining:
            self.start()

    def _give_up_held(self, error: Exception) -> None:
        """An internal error while holding a client: refuse it, say so once, go on."""
        held = self.held
        if held is not None:
            peer = format_sockaddr(held.plan.family, held.peer)
            self.internal_errors.report(f"holding the connection from {peer}", error)
        self.drop_held()
        if not self.worker.draining:
            self.start()

    def drop_held(self) -> None:
        """Refuse a client still waiting for capacity (queue mode): at the graceful
        timeout, or after an internal error."""
        held = self.held
        if held is not None:
            self.held = None
            why = REFUSED_CAP if held.waiting else REFUSED_BUSY  # what it was held for
            if held.waiting:
                held.waiting = False
                self.admitter.wait_end()
            self.slot[REFUSED] += 1
            held.plan.counters[REFUSAL_WORDS[why]] += 1
            os.close(held.fd)

    # -- running short of descriptors ------------------------------------------------------

    def _on_accept_error(self, error: OSError, listener: Listener) -> None:
        if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # The client stays in the backlog; stop looking until descriptors may be free,
            # instead of waking on the same readable listener at 100% CPU.
            self.failures.log(
                "cannot accept on %s: %s; pausing accepts for %gs",
                listener.label,
                error.strerror,
                ACCEPT_PAUSE,
            )
            self.pause()
        elif error.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
            self.failures.log("cannot accept on %s: %s, ignoring", listener.label, error)

    def pause(self) -> None:
        """Leave clients in the backlog for ACCEPT_PAUSE (one timer however often asked)."""
        if self.accepting:
            self.stop()
            self.loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        if not self.worker.draining and not self.accepting and self.held is None:
            if _lowest_free_fd(self.events_fd) >= self.fd_ceiling:
                self.loop.call_later(ACCEPT_PAUSE, self._resume)  # still short
                return
            self.start()


def _lowest_free_fd(any_fd: int) -> int:
    """The descriptor the next socket would get (RLIMIT_NOFILE's soft limit if none)."""
    try:
        probe = os.dup(any_fd)
    except OSError:
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    os.close(probe)
    return probe


def _fd_ceiling(any_fd: int) -> int:
    """The descriptor number from which accepting pauses: FD_HEADROOM below the limit, or
    a quarter of what was free at start if that is less (so an idle worker accepts)."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return limit - min(FD_HEADROOM, (limit - _lowest_free_fd(any_fd)) // 4)
