"""One worker process after fork: reset, uvloop loop, accept, admit, connect, drain.

A worker owns its scoreboard slot and writes nothing else that is shared. It accepts in
bounded batches from the listeners it inherited, admits each client through the global
`Admission` (or refuses it: accepted and closed at once, nothing sent upstream), opens
the upstream connection and hands both sockets to a `Relay`. On SIGTERM it stops
accepting and lets open connections finish until the graceful timeout. It exits by
itself if its master dies. Never forks. The relay options (issue 6) cost nothing per
connection while off: their per-worker parts are built once in `_setup_relay_options`.
"""

import ctypes
import errno
import gc
import logging
import math
import os
import resource
import signal
import socket
import struct
import time
from bisect import bisect_left
from collections.abc import Sequence
from functools import partial

from setproctitle import setproctitle

from forkproxy import logs
from forkproxy.relay.capacity_wait import CapacityWaiter
from forkproxy.relay.poller import Poller
from forkproxy.relay.proxy_protocol import HeaderEncoder, header_encoder
from forkproxy.relay.splice import PEER_GONE_ERRNOS, Direction, IdleDirection, PipePool, Relay
from forkproxy.relay.target_connect import (
    TCP_FAMILIES,
    SocketOptions,
    UpstreamConnect,
    send_proxy_header,
    set_socket_options,
)
from forkproxy.relay.targets import COOLDOWN, FailoverConnect, TargetGroup, route_groups
from forkproxy.relay.timeouts import LazySweep, sweep_connects, sweep_idle, sweep_interval
from forkproxy.settings.address import UpstreamAddress, format_sockaddr
from forkproxy.settings.options import ON_LIMIT_QUEUE, tcp_socket_options
from forkproxy.shared.admission import NO_TOKEN
from forkproxy.shared.per_source import BUSY, source_key
from forkproxy.shared.protocol import (
    EVENT_FORMAT,
    EVENT_IDLE,
    EVENT_READY,
    EXIT_CANNOT_START,
    EXIT_MASTER_GONE,
    EXIT_OK,
    MASTER_DEATH_SIGNAL,
    WorkerSpec,
    pipe_pool_keep,
)
from forkproxy.shared.scoreboard import (
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
    SlotState,
)
from forkproxy.supervisor.activation import Listener

log = logging.getLogger("forkproxy")

ACCEPT_BATCH = 32  # accepts per wakeup: bounded, so one busy listener cannot starve the rest
ACCEPT_PAUSE = 0.5  # seconds to stop accepting after running out of descriptors
# Issue 8: descriptors kept free for the pipes of open connections. Accepting pauses once
# new clients would leave fewer (at most a quarter of those free at start), so a flood of
# clients cannot take the pipes connections already relaying need, and waits in the backlog.
FD_HEADROOM = 32

_PR_SET_PDEATHSIG = 1
# Fault injection for tests: FORKPROXY_FAILPOINT=worker-crash makes every worker crash at
# start, as a bug would (uncaught exception, exit status 70).
_FAILPOINT = "FORKPROXY_FAILPOINT"


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


class _ListenerPlan:
    """What a worker does with the clients of one listener, worked out once."""

    __slots__ = ("listener", "family", "group", "client_options")

    def __init__(
        self, listener: Listener, group: TargetGroup, client_options: SocketOptions
    ) -> None:
        self.listener = listener
        self.family = listener.sock.family
        self.group = group  # where its clients go (--route, else the positional targets)
        self.client_options = client_options  # setsockopt(2) on each client: TCP only


class _PendingClient:
    """An admitted client while its upstream connection is being opened."""

    __slots__ = ("worker", "client", "token", "started", "peer", "connect", "group", "source_token")

    def __init__(
        self,
        worker: "Worker",
        client: socket.socket,
        token: int,
        peer: object,
        group: TargetGroup,
        source_token: int,
    ) -> None:
        self.worker = worker
        self.client = client
        self.token = token
        self.started = time.monotonic()
        self.peer = peer
        self.connect: UpstreamConnect | FailoverConnect | None = None
        self.group = group
        self.source_token = source_token  # the per-source unit held, or -1

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
        self.pool = PipePool(spec.config.pipe_size, pipe_pool_keep(spec.config.pipe_size))
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
        # Imported here, in the worker after fork: a master that loaded uvloop (and asyncio)
        # would hand a copy to every worker it forks (see workerspec.py).
        import uvloop

        self.loop = uvloop.new_event_loop()
        # Connection sockets are watched through this epoll, which the loop sees as one fd.
        self.poller = Poller(self.loop)
        self.accept_callbacks = {
            listener.fd: partial(self.on_listener_readable, listener) for listener in self.listeners
        }
        self.loop.add_signal_handler(signal.SIGTERM, self.on_sigterm)
        self.loop.add_signal_handler(MASTER_DEATH_SIGNAL, self.check_master)
        self._setup_relay_options(spec)
        self.fd_ceiling = _fd_ceiling(spec.events_fd)  # issue 8: FD_HEADROOM

    def _setup_relay_options(self, spec: WorkerSpec) -> None:
        """Issue 6: each relay option's per-worker part; None or empty while it is off."""
        config = spec.config
        tcp_options = tcp_socket_options(config.nodelay, config.keepalive)
        self.target_failures = logs.RateLimitedLog(log, logging.WARNING)

        def make_group(targets: Sequence[UpstreamAddress]) -> TargetGroup:
            return TargetGroup(targets, config.connect_timeout, tcp_options, self._on_target_failed)

        groups = route_groups(self.listeners, config.targets, config.routes, make_group)
        self.plans = {
            listener.fd: _ListenerPlan(
                listener,
                groups[listener.fd],
                tcp_options if listener.sock.family in TCP_FAMILIES else (),
            )
            for listener in self.listeners
        }
        self.proxy_header: HeaderEncoder | None = None
        if config.proxy_protocol:
            self.proxy_header = header_encoder(1 if config.proxy_protocol == 1 else 2)
        self.per_source = spec.per_source
        self.source_refusals = logs.RateLimitedLog(log, logging.WARNING)
        self.direction: type[Direction] = Direction
        self.idle_sweep: LazySweep | None = None
        if config.idle_timeout != math.inf:
            self.direction = IdleDirection
            self.idle_sweep = LazySweep(
                self.loop, sweep_interval(config.idle_timeout), self.relays, self._sweep_idle
            )
        self.connect_sweep: LazySweep | None = None
        if config.connect_timeout != math.inf:
            self.connect_sweep = LazySweep(
                self.loop,
                sweep_interval(config.connect_timeout),
                self.pending,
                self._sweep_connects,
            )
        self.queue_on_limit = config.on_limit == ON_LIMIT_QUEUE
        self.held: tuple[int, object, _ListenerPlan] | None = None  # queue: fd, peer, plan
        self.waiter: CapacityWaiter | None = None  # queue: started when first needed

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
        # Everything built so far lives as long as the worker: keep it out of the cyclic
        # collector's work (a connection's objects are freed by reference counting).
        gc.freeze()
        try:
            self.loop.run_forever()
        finally:
            self.poller.close()
            self.pool.close()
        return EXIT_OK

    # -- accepting ---------------------------------------------------------------------

    def _start_accepting(self) -> None:
        # In our poller too: a wakeup that finds new clients and ready connections
        # serves both in one dispatch.
        self.accepting = True
        for listener in self.listeners:
            self.poller.add_reader(listener.fd, self.accept_callbacks[listener.fd])

    def _stop_accepting(self) -> None:
        if self.accepting:
            self.accepting = False
            for listener in self.listeners:
                self.poller.remove_reader(listener.fd)

    def on_listener_readable(self, listener: Listener) -> None:
        accept = listener.sock._accept  # type: ignore[attr-defined]  # fd, no socket object
        family = listener.sock.family
        plan = self.plans[listener.fd]
        admission = self.admission
        slot = self.slot
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
            if fd >= self.fd_ceiling:
                # The kernel gives the lowest free descriptor: all below this one are taken.
                # Serve this client from the headroom; the next ones wait in the backlog.
                self.accept_failures.log(
                    "fewer than %d file descriptors left (RLIMIT_NOFILE %d): pausing accepts "
                    "for %gs to keep them for open connections",
                    FD_HEADROOM,
                    resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    ACCEPT_PAUSE,
                )
                self._pause_accepting()
            token = admission.try_acquire()
            if token == NO_TOKEN and self.queue_on_limit:
                self._hold(fd, peer, plan)
                return
            if token == NO_TOKEN:
                slot[REFUSED] += 1  # before the close: a kill between them must not hide it
                os.close(fd)
                self.refusals.log(
                    "connection cap %d reached, refusing connection from %s",
                    self.config.connections_max,
                    format_sockaddr(family, peer),
                )
                continue
            self._admit(fd, peer, plan, token)

    def _admit(self, fd: int, peer: object, plan: _ListenerPlan, token: int) -> None:
        """A client holding a global token: check its source, then connect it upstream."""
        family = plan.family
        source_token = -1
        per_source = self.per_source
        if per_source is not None:
            key = source_key(family, peer)
            if key is not None:
                source_token = per_source.try_acquire(key)
                if source_token < 0:
                    self._refuse_source(fd, family, peer, token, source_token)
                    return
        slot = self.slot
        slot[ACCEPTED] += 1
        slot[ACTIVE] += 1
        client = socket.socket(family, socket.SOCK_STREAM, 0, fd)
        client.setblocking(False)
        if plan.client_options:
            try:
                set_socket_options(client, plan.client_options)
            except OSError:
                pass  # the client is gone already: its relay will find out
        self._connect(client, token, peer, plan.group, source_token)

    def _refuse_source(self, fd: int, family: int, peer: object, token: int, why: int) -> None:
        self.slot[REFUSED] += 1
        os.close(fd)
        self.admission.release(token)
        assert self.per_source is not None
        if why == BUSY:
            self.source_refusals.log(
                "per-source connection table busy, refusing connection from %s",
                format_sockaddr(family, peer),
            )
        else:
            self.source_refusals.log(
                "connection limit %d per source reached, refusing connection from %s",
                self.per_source.per_source,
                format_sockaddr(family, peer),
            )

    # -- --on-limit=queue ----------------------------------------------------------------

    def _hold(self, fd: int, peer: object, plan: _ListenerPlan) -> None:
        """At the cap in queue mode: keep this client, stop accepting so the next ones wait
        in the listen backlog, and wait for capacity (why a thread: capacity_wait.py)."""
        if self.held is not None:  # not reached: accepting stops while a client is held
            self.slot[REFUSED] += 1
            os.close(fd)
            return
        self.held = (fd, peer, plan)
        self._stop_accepting()
        if self.waiter is None:
            self.waiter = CapacityWaiter(self.admission, self.loop, self.on_capacity)
        self.waiter.request()

    def on_capacity(self, token: int) -> None:
        """The helper thread took a unit of capacity for us: serve the held client."""
        held = self.held
        if held is None:  # closed by the graceful timeout meanwhile
            self.admission.release(token)
            return
        self.held = None
        fd, peer, plan = held
        self._admit(fd, peer, plan, token)
        if not self.draining:
            self._start_accepting()

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
            self._pause_accepting()
        elif error.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
            self.accept_failures.log("cannot accept on %s: %s, ignoring", listener.label, error)

    def _pause_accepting(self) -> None:
        """Leave clients in the backlog for ACCEPT_PAUSE (one timer however often asked)."""
        if self.accepting:
            self._stop_accepting()
            self.loop.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if not self.draining and not self.accepting and self.held is None:
            if _lowest_free_fd(self.spec.events_fd) >= self.fd_ceiling:
                self.loop.call_later(ACCEPT_PAUSE, self._resume_accepting)  # still short
                return
            self._start_accepting()

    # -- connecting ----------------------------------------------------------------------

    def _connect(
        self,
        client: socket.socket,
        token: int,
        peer: object,
        group: TargetGroup,
        source_token: int,
    ) -> None:
        pending = _PendingClient(self, client, token, peer, group, source_token)
        self.pending.add(pending)
        self._start_connect(pending)

    def _start_connect(self, pending: _PendingClient) -> None:
        attempt = pending.group.connect(
            self.loop, self.poller, pending.on_connected, pending.on_failed
        )
        # On loopback the connect usually ended (on_upstream_connected or _failed ran)
        # inside group.connect(): only an attempt still under way is kept and timed.
        if pending in self.pending and pending.connect is None:
            pending.connect = attempt
            sweep = self.connect_sweep
            if sweep is not None and not sweep.armed:
                sweep.arm()

    def _sweep_connects(self, now: float) -> None:
        sweep_connects([p.connect for p in self.pending if p.connect is not None], now)

    def _on_target_failed(self, target: UpstreamAddress, error: OSError, newly: bool) -> None:
        if newly:
            self.target_failures.log(
                "cannot connect to upstream '%s': %s; trying the other targets, and it only "
                "after them for %gs",
                target.text,
                error.strerror or error,
                COOLDOWN,
            )

    def on_upstream_connected(self, pending: _PendingClient, upstream: socket.socket) -> None:
        self.pending.discard(pending)
        pending.connect = None  # it holds our bound methods: no cycle left to the collector
        slot = self.slot
        _observe(
            slot,
            CONNECT_DURATION_BUCKETS,
            CONNECT_DURATION_BOUNDS,
            CONNECT_DURATION_SUM_NS,
            time.monotonic() - pending.started,
        )
        if self.proxy_header is not None and not self._send_proxy_header(pending, upstream):
            return
        relay = Relay(
            self.poller,
            self.pool,
            pending.client,
            upstream,
            slot,
            BYTES_TO_UPSTREAM,
            BYTES_TO_CLIENT,
            self.on_relay_closed,
            self.direction,
        )
        relay.token = pending.token
        relay.source_token = pending.source_token
        relay.started = pending.started
        relay.peer = pending.peer
        self.relays.add(relay)
        idle_sweep = self.idle_sweep
        if idle_sweep is not None:
            relay.quiet_since = time.monotonic()
            idle_sweep.arm()
        relay.start()

    def _send_proxy_header(self, pending: _PendingClient, upstream: socket.socket) -> bool:
        """--proxy-protocol: the header first, in one send(2); False if that failed."""
        assert self.proxy_header is not None
        client = pending.client
        family = client.family
        try:
            local = client.getsockname() if family in TCP_FAMILIES else None
            send_proxy_header(upstream, self.proxy_header(pending.peer, local, family))
        except OSError as error:
            upstream.close()
            reason = f"sending the PROXY protocol header: {error.strerror or error}"
            self.on_upstream_failed(pending, OSError(error.errno, reason))
            return False
        return True

    def _sweep_idle(self, now: float) -> None:
        sweep_idle(self.relays, now, self.config.idle_timeout)

    def on_upstream_failed(self, pending: _PendingClient, error: OSError) -> None:
        pending.connect = None
        if error.errno in (errno.EMFILE, errno.ENFILE) and not self.draining:
            # Issue 8: socket() found no free descriptor. Closing this client and going on
            # accepting would drop every client in the backlog at full speed; keep it, leave
            # the rest in the backlog, and try again once descriptors may be free.
            self.accept_failures.log(
                "cannot open a connection to upstream %s: %s; pausing accepts for %gs",
                pending.group.label,
                error.strerror or error,
                ACCEPT_PAUSE,
            )
            self._pause_accepting()
            self.loop.call_later(ACCEPT_PAUSE, self._retry_connect, pending)
            return
        self.pending.discard(pending)
        self.slot[CONNECT_ERRORS] += 1
        self.connect_failures.log(
            "cannot connect to upstream %s for %s: %s, closing connection",
            pending.group.label,
            format_sockaddr(pending.client.family, pending.peer),
            error.strerror or error,
        )
        pending.client.close()
        self._connection_ended(pending.token, pending.source_token)

    def _retry_connect(self, pending: _PendingClient) -> None:
        if pending not in self.pending:
            return  # closed meanwhile by the graceful timeout
        self._start_connect(pending)

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
        self._connection_ended(relay.token, relay.source_token)

    def _connection_ended(self, token: int, source_token: int = -1) -> None:
        self.admission.release(token)
        if source_token >= 0 and self.per_source is not None:
            self.per_source.release(source_token)
        slot = self.slot
        slot[ACTIVE] -= 1
        slot[CLOSED] += 1
        slot[LAST_ACTIVITY_NS] = time.monotonic_ns()
        if self.report_idle and slot[ACTIVE] == 0:
            self._send_event(EVENT_IDLE)
        if self.draining and not self.relays and not self.pending and self.held is None:
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
        if self.per_source is not None:
            self.per_source.remove()
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
        if not self.relays and not self.pending and self.held is None:
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
        if self.held is not None:  # queue mode: a client still waiting for capacity
            self.slot[REFUSED] += 1
            os.close(self.held[0])
            self.held = None
        for pending in list(self.pending):
            if pending.connect is not None:
                pending.connect.cancel()
            pending.client.close()
            self.pending.discard(pending)
            self._connection_ended(pending.token, pending.source_token)
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


def _set_parent_death_signal(signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
