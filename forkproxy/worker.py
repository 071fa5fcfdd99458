"""One worker process after fork: reset, uvloop loop, accept, admit, connect, drain.

A worker owns its scoreboard slot and writes nothing else that is shared. It accepts in
bounded batches from the listeners it inherited, admits each client through the global
`Admission` (or refuses it: accepted and closed at once, nothing sent upstream), opens
the upstream connection and hands both sockets to a `Relay`. On SIGTERM it stops
accepting and lets open connections finish until the graceful timeout. It exits by
itself if its master dies. Never forks.
"""

import ctypes
import errno
import logging
import os
import signal
import socket
import struct
import time
from bisect import bisect_left
from dataclasses import dataclass

import uvloop
from setproctitle import setproctitle

from forkproxy import logs
from forkproxy.activation import Listener
from forkproxy.address import format_sockaddr
from forkproxy.admission import NO_TOKEN, Admission
from forkproxy.config import Config
from forkproxy.relay import PEER_GONE_ERRNOS, PipePool, Relay
from forkproxy.scoreboard import (
    ACCEPTED,
    ACTIVE,
    BYTES_TO_CLIENT,
    BYTES_TO_UPSTREAM,
    CLOSED,
    CONNECT_DURATION_BOUNDS,
    CONNECT_DURATION_BUCKETS,
    CONNECT_DURATION_SUM_NS,
    CONNECT_ERRORS,
    CONNECTION_DURATION_BOUNDS,
    CONNECTION_DURATION_BUCKETS,
    CONNECTION_DURATION_SUM_NS,
    HEARTBEAT_NS,
    LAST_ACTIVITY_NS,
    PID,
    REFUSED,
    STATE,
    Scoreboard,
    SlotState,
)
from forkproxy.upstream import UpstreamConnect

log = logging.getLogger("forkproxy")

# Exit statuses: the protocol between a worker and its master.
EXIT_OK = 0
EXIT_CANNOT_START = 3  # setup failed: respawning would fail the same way
EXIT_MASTER_GONE = 4

# Messages on the event pipe to the master: struct EVENT_FORMAT (slot, event).
EVENT_FORMAT = "=HH"
EVENT_SIZE = struct.calcsize(EVENT_FORMAT)
EVENT_READY = 1  # the worker is accepting
EVENT_IDLE = 2  # the worker's last connection closed (sent only with --exit-idle-time)

# The signal the kernel sends a worker when its master dies (PR_SET_PDEATHSIG).
MASTER_DEATH_SIGNAL = signal.SIGUSR2

ACCEPT_BATCH = 32  # accepts per wakeup: bounded, so one busy listener cannot starve the rest
ACCEPT_PAUSE = 0.5  # seconds to stop accepting after running out of descriptors
PIPE_POOL_KEEP = 64  # empty pipes a worker keeps for reuse
PIPE_SIZE = 0  # 0: the kernel's default pipe size

_PR_SET_PDEATHSIG = 1
# Fault injection for tests: FORKPROXY_FAILPOINT=worker-crash makes every worker crash at
# start, as a bug would (uncaught exception, exit status 70).
_FAILPOINT = "FORKPROXY_FAILPOINT"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What the master hands a new worker."""

    config: Config
    slot: int
    generation: int
    listeners: tuple[Listener, ...]
    scoreboard: Scoreboard
    admission: Admission
    events_fd: int
    master_pid: int
    heartbeat_interval: float


def run_worker(spec: WorkerSpec) -> int:
    """The whole life of a worker process; returns its exit status."""
    if os.environ.get(_FAILPOINT) == "worker-crash":
        raise RuntimeError("crashing at start, as FORKPROXY_FAILPOINT=worker-crash asks")
    logs.set_process_tag(f"worker {spec.slot}: ")
    setproctitle(f"forkproxy: worker {spec.slot}")
    try:
        worker = Worker(spec)
    except OSError as error:
        log.error("cannot start: %s", error)
        return EXIT_CANNOT_START
    return worker.run()


class _PendingClient:
    """An admitted client while its upstream connection is being opened."""

    __slots__ = ("worker", "client", "token", "started", "peer", "connect")

    def __init__(self, worker: "Worker", client: socket.socket, token: int, peer: object) -> None:
        self.worker = worker
        self.client = client
        self.token = token
        self.started = time.monotonic()
        self.peer = peer
        self.connect: UpstreamConnect | None = None

    def on_connected(self, upstream: socket.socket) -> None:
        self.worker.on_upstream_connected(self, upstream)

    def on_failed(self, error: OSError) -> None:
        self.worker.on_upstream_failed(self, error)


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.config = spec.config
        self.target = spec.config.target
        self.admission = spec.admission
        self.admission.spread_from(spec.slot)
        self.slot = spec.scoreboard.slot(spec.slot)
        self.listeners = spec.listeners
        self.pool = PipePool(PIPE_SIZE, PIPE_POOL_KEEP)
        self.pending: set[_PendingClient] = set()
        self.relays: set[Relay] = set()
        self.draining = False
        self.accepting = False
        self.report_idle = spec.config.exit_idle_time != float("inf")
        self.refusals = logs.RateLimitedLog(log, logging.WARNING)
        self.connect_failures = logs.RateLimitedLog(log, logging.WARNING)
        self.accept_failures = logs.RateLimitedLog(log, logging.WARNING)
        self.relay_failures = logs.RateLimitedLog(log, logging.WARNING)
        self._reset_signals()
        _set_parent_death_signal(MASTER_DEATH_SIGNAL)
        self.loop = uvloop.new_event_loop()
        self.loop.add_signal_handler(signal.SIGTERM, self.on_sigterm)
        self.loop.add_signal_handler(MASTER_DEATH_SIGNAL, self.check_master)

    @staticmethod
    def _reset_signals() -> None:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGQUIT, MASTER_DEATH_SIGNAL):
            signal.signal(signum, signal.SIG_DFL)
        # A terminal's Ctrl-C and job-control signals reach the whole process group;
        # the master decides what they mean.
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(signum, signal.SIG_IGN)

    def run(self) -> int:
        slot = self.slot
        slot[PID] = os.getpid()
        self.check_master()
        self._start_accepting()
        slot[STATE] = SlotState.SERVING
        self._heartbeat()
        self._send_event(EVENT_READY)
        # The master forked us with its signals blocked. uvloop dispatches signals only
        # once run_forever() has installed its wakeup fd, so unblock from inside the loop:
        # a SIGTERM that arrived during start-up is handled now rather than lost.
        self.loop.call_soon(signal.pthread_sigmask, signal.SIG_SETMASK, set())
        try:
            self.loop.run_forever()
        finally:
            self.pool.close()
        return EXIT_OK

    # -- accepting ---------------------------------------------------------------------

    def _start_accepting(self) -> None:
        self.accepting = True
        for listener in self.listeners:
            self.loop.add_reader(listener.fd, self.on_listener_readable, listener)

    def _stop_accepting(self) -> None:
        if self.accepting:
            self.accepting = False
            for listener in self.listeners:
                self.loop.remove_reader(listener.fd)

    def on_listener_readable(self, listener: Listener) -> None:
        accept = listener.sock._accept  # type: ignore[attr-defined]  # fd, no socket object
        family = listener.sock.family
        admission = self.admission
        slot = self.slot
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = accept()
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as error:
                self._on_accept_error(error, listener)
                return
            token = admission.try_acquire()
            if token == NO_TOKEN:
                os.close(fd)
                slot[REFUSED] += 1
                self.refusals.log(
                    "connection cap %d reached, refusing connection from %s",
                    self.config.connections_max,
                    format_sockaddr(family, peer),
                )
                continue
            slot[ACCEPTED] += 1
            slot[ACTIVE] += 1
            client = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            client.setblocking(False)
            self._connect(client, token, peer)

    def _on_accept_error(self, error: OSError, listener: Listener) -> None:
        if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # The client stays in the backlog; stop looking until descriptors may be free,
            # instead of waking on the same readable listener at 100% CPU.
            self.accept_failures.log(
                "cannot accept on %s: %s; pausing accepts for %gs",
                listener.label,
                error.strerror,
                ACCEPT_PAUSE,
            )
            self._stop_accepting()
            self.loop.call_later(ACCEPT_PAUSE, self._resume_accepting)
        elif error.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
            self.accept_failures.log("cannot accept on %s: %s, ignoring", listener.label, error)

    def _resume_accepting(self) -> None:
        if not self.draining and not self.accepting:
            self._start_accepting()

    # -- connecting ----------------------------------------------------------------------

    def _connect(self, client: socket.socket, token: int, peer: object) -> None:
        pending = _PendingClient(self, client, token, peer)
        connect = UpstreamConnect(self.loop, self.target, pending.on_connected, pending.on_failed)
        pending.connect = connect
        self.pending.add(pending)
        connect.start()

    def on_upstream_connected(self, pending: _PendingClient, upstream: socket.socket) -> None:
        self.pending.discard(pending)
        slot = self.slot
        _observe(
            slot,
            CONNECT_DURATION_BUCKETS,
            CONNECT_DURATION_BOUNDS,
            CONNECT_DURATION_SUM_NS,
            time.monotonic() - pending.started,
        )
        relay = Relay(
            self.loop,
            self.pool,
            pending.client,
            upstream,
            slot,
            BYTES_TO_UPSTREAM,
            BYTES_TO_CLIENT,
            self.on_relay_closed,
        )
        relay.token = pending.token
        relay.started = pending.started
        relay.peer = pending.peer
        self.relays.add(relay)
        relay.start()

    def on_upstream_failed(self, pending: _PendingClient, error: OSError) -> None:
        self.pending.discard(pending)
        self.slot[CONNECT_ERRORS] += 1
        self.connect_failures.log(
            "cannot connect to upstream '%s' for %s: %s, closing connection",
            self.target.text,
            format_sockaddr(pending.client.family, pending.peer),
            error.strerror or error,
        )
        pending.client.close()
        self._connection_ended(pending.token)

    # -- closing -------------------------------------------------------------------------

    def on_relay_closed(self, relay: Relay) -> None:
        self.relays.discard(relay)
        error = relay.error
        if error is not None and error.errno not in PEER_GONE_ERRNOS:
            self.relay_failures.log(
                "connection from %s failed: %s, closing connection",
                format_sockaddr(relay.client.family, relay.peer),
                error,
            )
        _observe(
            self.slot,
            CONNECTION_DURATION_BUCKETS,
            CONNECTION_DURATION_BOUNDS,
            CONNECTION_DURATION_SUM_NS,
            time.monotonic() - relay.started,
        )
        self._connection_ended(relay.token)

    def _connection_ended(self, token: int) -> None:
        self.admission.release(token)
        slot = self.slot
        slot[ACTIVE] -= 1
        slot[CLOSED] += 1
        slot[LAST_ACTIVITY_NS] = time.monotonic_ns()
        if self.report_idle and slot[ACTIVE] == 0:
            self._send_event(EVENT_IDLE)
        if self.draining and not self.relays and not self.pending:
            self.loop.stop()

    # -- lifecycle -----------------------------------------------------------------------

    def _heartbeat(self) -> None:
        self.slot[HEARTBEAT_NS] = time.monotonic_ns()
        self.check_master()
        self.loop.call_later(self.spec.heartbeat_interval, self._heartbeat)

    def check_master(self) -> None:
        """Exit at once if the master is gone: nobody would supervise or stop us."""
        if os.getppid() == self.spec.master_pid:
            return
        log.warning("master process %d is gone, exiting", self.spec.master_pid)
        self.admission.remove()
        os._exit(EXIT_MASTER_GONE)

    def on_sigterm(self) -> None:
        """Graceful stop: no new connections; open ones finish until the graceful timeout."""
        if self.draining:
            return
        self.draining = True
        self.slot[STATE] = SlotState.DRAINING
        self._stop_accepting()
        for listener in self.listeners:
            listener.sock.close()  # our copy only: the master and systemd keep theirs
        if not self.relays and not self.pending:
            self.loop.stop()
            return
        log.info(
            "stopping: waiting up to %gs for %d connections",
            self.config.graceful_timeout,
            len(self.relays) + len(self.pending),
        )
        if self.config.graceful_timeout != float("inf"):
            self.loop.call_later(self.config.graceful_timeout, self._on_graceful_timeout)

    def _on_graceful_timeout(self) -> None:
        log.warning(
            "graceful timeout: closing %d open connections", len(self.relays) + len(self.pending)
        )
        for pending in list(self.pending):
            if pending.connect is not None:
                pending.connect.cancel()
            pending.client.close()
            self.pending.discard(pending)
            self._connection_ended(pending.token)
        for relay in list(self.relays):
            relay.close()
        self.loop.stop()

    def _send_event(self, event: int) -> None:
        try:
            os.write(self.spec.events_fd, struct.pack(EVENT_FORMAT, self.spec.slot, event))
        except OSError as error:
            log.debug("cannot notify the master: %s", error)


def _observe(
    slot: memoryview, first_bucket: int, bounds: tuple[float, ...], sum_field: int, seconds: float
) -> None:
    slot[first_bucket + bisect_left(bounds, seconds)] += 1
    slot[sum_field] += int(seconds * 1e9)


def _set_parent_death_signal(signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
