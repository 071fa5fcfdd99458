"""One worker process after fork: reset, uvloop loop, heartbeat, drain on stop.

A worker owns its scoreboard slot and its column of the per-source table; of what else is
shared it writes only per-source keys and queue-mode futex words, under admission's
protocol. Its stream listeners' clients are relayed by the compiled engine when it runs
(compiled.py; engine.py decides), and its datagram listeners read by it when none has a
host-name target (compiled_datagram.py); the others', and all with the Python engine, are
taken off the listeners it inherited by its `Acceptor` (accepting.py) and connected to
their target and relayed by its `Connector` (connecting.py), or read by its
`DatagramRelay` (datagram.py); the worker holds what they share: the loop, the poller,
its slot, its admitter (a connection's admission goes back to it when the connection
ends). On SIGTERM
it stops accepting and lets open connections finish until the graceful timeout. It exits
by itself if its master dies. Never forks. The relay options cost nothing per connection
while off: what each listener's settings need is built once, in its plan (plans.py).
"""

import ctypes
import gc
import logging
import os
import signal
import socket
import struct
import time
from typing import Any

from setproctitle import setproctitle

from forkproxy import logs
from forkproxy.relay.accepting import Acceptor
from forkproxy.relay.access_log import AccessLogFiles
from forkproxy.relay.compiled import CompiledRelay, stream_listener_rows
from forkproxy.relay.compiled_datagram import compiled_reads
from forkproxy.relay.connecting import Connector
from forkproxy.relay.datagram import DatagramRelay
from forkproxy.relay.engine import C, compiled_module, engine_name, engine_supports
from forkproxy.relay.failpoints import WORKER_CRASH, failpoint_from_environment
from forkproxy.relay.messages import MessageBuffer, message_buffer, message_buffer_size
from forkproxy.relay.pipes import PipePool
from forkproxy.relay.plans import WorkerTargets, make_plans
from forkproxy.relay.poller import Poller
from forkproxy.settings.config import Config
from forkproxy.settings.kinds import STREAM
from forkproxy.shared.layout import MAX_LISTENERS, ROW_WORDS
from forkproxy.shared.listener import Listener
from forkproxy.shared.protocol import (
    EVENT_FORMAT,
    EVENT_IDLE,
    EVENT_READY,
    EXIT_CANNOT_START,
    EXIT_MASTER_GONE,
    EXIT_OK,
    MASTER_DEATH_SIGNAL,
    WorkerSpec,
    reads_datagram_listener,
)
from forkproxy.shared.scoreboard import (
    ACTIVE,
    CLOSED,
    HEARTBEAT_NS,
    LAST_ACTIVITY_NS,
    PID,
    STATE,
    SlotState,
)

log = logging.getLogger("forkproxy")

_PR_SET_PDEATHSIG = 1
# A terminal's Ctrl-C, job control and an admin's signal to the whole process group reach
# every worker too: the master decides what these mean, a worker ignores them (most would
# end it by default). SIGTERM (drain) and MASTER_DEATH_SIGNAL are the worker's own.
_MASTERS_SIGNALS = (
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    signal.SIGWINCH,
    signal.SIGURG,
)


def run_worker(spec: WorkerSpec) -> int:
    """The whole life of a worker process; returns its exit status."""
    failpoint = failpoint_from_environment()  # tests only: see failpoints.py
    if failpoint is not None and failpoint.stage == WORKER_CRASH:
        raise RuntimeError("crashing at start, as FORKPROXY_FAILPOINT=worker-crash asks")
    logs.set_process_tag(f"worker {spec.slot}: ")
    setproctitle(f"forkproxy: worker {spec.slot}")
    try:
        worker = Worker(spec)
    except OSError as error:
        log.error("cannot start: %s", error)
        return EXIT_CANNOT_START
    return worker.run()


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.config = config = spec.config
        self.admitter = spec.admission.admitter(spec.slot)
        self.slot = spec.scoreboard.slot(spec.slot)
        # Stream and sequential-packet listeners are accepted on; datagram ones are read,
        # each by one worker of a generation only (supervisor/ranks.py). The compiled
        # engine, when it runs, takes the stream ones; `listeners` are the Python engine's.
        accepted = tuple(listener for listener in spec.listeners if not listener.is_datagram)
        compiled = self._compiled_listeners(accepted, config)
        self.listeners = tuple(listener for listener in accepted if listener not in compiled)
        datagram = self._datagram_listeners(spec)
        # The compiled engine reads them all, or the Python one does (compiled_datagram.py).
        compiled_datagram = datagram if self._compiled_reads(datagram, config) else []
        datagram_listeners = [
            (listener, _listener_row(spec, index))
            for listener, index in datagram
            if not compiled_datagram
        ]
        self.message_buffer: MessageBuffer | None = None  # datagrams, sequential packets
        messaging = [
            *(listener for listener, _ in datagram_listeners),
            *(one for one in self.listeners if one.kind != STREAM),
        ]
        if messaging:
            unix = any(listener.sock.family == socket.AF_UNIX for listener in messaging)
            self.message_buffer = message_buffer(unix)
        self.pools: dict[int, PipePool] = {}  # by pipe size: one per size a listener uses
        self.draining = False
        self.report_idle = config.exit_idle_time != float("inf")
        self._reset_signals()
        _set_parent_death_signal(MASTER_DEATH_SIGNAL)
        # Imported here, in the worker after fork: a master that loaded uvloop (and asyncio)
        # would hand a copy to every worker it forks (see shared/protocol.py).
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.loop.set_exception_handler(self.on_loop_error)
        # Connection sockets are watched through this epoll, which the loop sees as one fd.
        self.poller = Poller(self.loop, self.on_callback_error)
        self.loop.add_signal_handler(signal.SIGTERM, self.on_sigterm)
        self.loop.add_signal_handler(MASTER_DEATH_SIGNAL, self.check_master)
        failpoint = failpoint_from_environment()  # tests only: see failpoints.py
        self.connector = Connector(self, failpoint)
        self.internal_errors = self.connector.internal_errors
        self.access_logs = AccessLogFiles(self.slot)  # --access-log files; ours to close
        plans = make_plans(
            self.listeners,
            config,
            self.connector,
            self.pools,
            self._worker_targets(spec),
            self.access_logs,
        )
        self.datagrams: DatagramRelay | None = None
        if datagram_listeners:
            assert self.message_buffer is not None
            self.datagrams = DatagramRelay(self, datagram_listeners, self.message_buffer)
        # Last: they measure the descriptors left once everything above took its own.
        self.compiled: CompiledRelay | None = None
        if compiled or compiled_datagram:
            module = compiled_module()
            assert module is not None  # engine_name() said C
            rows = stream_listener_rows(spec.listeners, compiled)
            unix = any(one.sock.family == socket.AF_UNIX for one, _ in compiled_datagram)
            self.compiled = CompiledRelay(
                self,
                module,
                compiled,
                rows,
                [(one, index if index < MAX_LISTENERS else -1) for one, index in compiled_datagram],
                message_buffer_size(unix),
            )
        self.acceptor = Acceptor(self, plans, failpoint)
        if self.access_logs:  # opened by either engine's listeners above
            self.loop.add_signal_handler(signal.SIGUSR1, self.access_logs.reopen)

    @staticmethod
    def _compiled_listeners(
        listeners: tuple[Listener, ...], config: Config
    ) -> tuple[Listener, ...]:
        """The stream listeners the compiled engine relays: all, when it runs and supports
        the settings; none otherwise (the Python engine then relays them)."""
        stream = tuple(listener for listener in listeners if listener.kind == STREAM)
        if not stream or engine_name() != C:
            return ()
        if engine_supports(config) is not None:  # the master said why, once
            return ()
        return stream

    @staticmethod
    def _compiled_reads(datagram: list[tuple[Listener, int]], config: Config) -> bool:
        """Whether the compiled engine reads this worker's datagram listeners."""
        if not datagram or engine_name() != C or engine_supports(config) is not None:
            return False
        return compiled_reads(config, [listener for listener, _ in datagram])

    @staticmethod
    def _datagram_listeners(spec: WorkerSpec) -> list[tuple[Listener, int]]:
        """The datagram listeners this worker reads, each with its index among all
        listeners (its row of counters in our slot); it closes its copies of the others."""
        mine = []
        datagram = 0
        for index, listener in enumerate(spec.listeners):
            if not listener.is_datagram:
                continue
            if reads_datagram_listener(datagram, spec.rank, spec.generation_size):
                mine.append((listener, index))
            else:
                listener.sock.close()  # our copy only: the master keeps its own
            datagram += 1
        return mine

    @staticmethod
    def _worker_targets(spec: WorkerSpec) -> WorkerTargets | None:
        """Our stream listeners' rows of the target table and rows of counters."""
        if spec.targets is None:
            return None
        by_fd = {}
        counters = {}
        for index, listener in enumerate(spec.listeners):
            if listener.is_datagram:
                continue
            counters[listener.fd] = _listener_row(spec, index)
            if index < len(spec.listener_targets):
                by_fd[listener.fd] = spec.listener_targets[index]
        return WorkerTargets(spec.targets, spec.scoreboard, spec.slot, by_fd, counters)

    @staticmethod
    def _reset_signals() -> None:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGQUIT, MASTER_DEATH_SIGNAL):
            signal.signal(signum, signal.SIG_DFL)
        for signum in _MASTERS_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def run(self) -> int:
        slot = self.slot
        slot[PID] = os.getpid()
        self.check_master()
        self.acceptor.start()
        if self.compiled is not None:
            self.compiled.start()
        if self.datagrams is not None:
            self.datagrams.start()
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
            if self.compiled is not None:
                self.compiled.close()
            self.poller.close()
            for pool in self.pools.values():
                pool.close()
            self.access_logs.close()
        return EXIT_OK

    def connection_ended(self, token: int) -> None:
        """An admitted connection is gone (its descriptors closed): return its admission
        and count it closed."""
        self.admitter.release(token)
        slot = self.slot
        slot[ACTIVE] -= 1
        slot[CLOSED] += 1
        slot[LAST_ACTIVITY_NS] = time.monotonic_ns()
        if self.report_idle and slot[ACTIVE] == 0:
            self._send_event(EVENT_IDLE)
        if self.draining and self._idle():
            self.loop.stop()

    def on_compiled_idle(self) -> None:
        """The compiled engine's last connection ended: as `connection_ended` for it (the
        engine released the connection and counted it in the slot itself)."""
        if self.report_idle and self.slot[ACTIVE] == 0:
            self._send_event(EVENT_IDLE)
        self.on_drained_part()

    def on_drained_part(self) -> None:
        """Something that kept a draining worker alive has ended (a datagram session, the
        compiled engine's last connection)."""
        if self.draining and self._idle():
            self.loop.stop()

    def _idle(self) -> bool:
        connector = self.connector
        return (
            not connector.relays
            and not connector.pending
            and self.acceptor.held is None
            and not self.acceptor.headers
            and not self.datagrams
            and (self.compiled is None or self.compiled.idle())
        )

    def _open_count(self) -> int:
        """Connections and datagram sessions open."""
        compiled = 0 if self.compiled is None else self.compiled.open_count()
        return self.connector.open_count() + len(self.datagrams or ()) + compiled

    # -- internal errors -----------------------------------------------------------------

    def on_callback_error(self, fd: int, error: Exception) -> None:
        """The poller's `on_error`: a callback for `fd` raised. Release its connection, or
        for a listener, pause accepting (a fault that repeats then cannot spin)."""
        connection = self.connector.owner_of(fd)
        if connection is not None:
            self.connector.crashed(connection, error)
            return
        if any(listener.fd == fd for listener in self.listeners):
            self.internal_errors.report_other(f"accepting on fd {fd}", error)
            self.acceptor.pause()  # it watches the listener again afterwards
            return
        self.internal_errors.report_other(f"in a callback for fd {fd}", error)

    def on_loop_error(self, loop: object, context: dict[str, Any]) -> None:
        """The loop's exception handler: a timer, a task or a signal handler raised."""
        error = context.get("exception")
        if not isinstance(error, Exception):
            error = RuntimeError(context.get("message", "unknown error"))
        self.internal_errors.report_other("in the event loop", error)

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
        os._exit(EXIT_MASTER_GONE)

    def on_sigterm(self) -> None:
        """Graceful stop: no new connections; open ones finish until the graceful timeout."""
        if self.draining:
            return
        self.draining = True
        self.slot[STATE] = SlotState.DRAINING
        self.acceptor.close()
        if self.compiled is not None:
            self.compiled.drain()
        if self.datagrams is not None:
            self.datagrams.stop_reading()  # its sessions still pass replies back
        if self._idle():
            self.loop.stop()
            return
        log.info(
            "stopping: waiting up to %gs for %d connections and datagram sessions",
            self.config.graceful_timeout,
            self._open_count(),
        )
        if self.config.graceful_timeout != float("inf"):
            self.loop.call_later(self.config.graceful_timeout, self._on_graceful_timeout)

    def _on_graceful_timeout(self) -> None:
        log.warning(
            "graceful timeout: closing %d open connections and datagram sessions",
            self._open_count(),
        )
        self.acceptor.drop_held()  # queue mode: a client still waiting for capacity
        self.acceptor.headers.close_all()  # --accept-proxy: clients sending their header
        self.connector.close_all()
        if self.compiled is not None:
            self.compiled.close_all()
        if self.datagrams is not None:
            self.datagrams.close_all()
        self.loop.stop()

    def _send_event(self, event: int) -> None:
        try:
            os.write(self.spec.events_fd, struct.pack(EVENT_FORMAT, self.spec.slot, event))
        except OSError as error:
            log.debug("cannot notify the master: %s", error)


def _listener_row(spec: WorkerSpec, index: int) -> memoryview:
    """Listener `index`'s row in our slot; one of our own past MAX_LISTENERS listeners
    (their counters are not reported: the master says so at start)."""
    if index < MAX_LISTENERS:
        return spec.scoreboard.row(spec.slot, index)
    return memoryview(bytearray(ROW_WORDS * 8)).cast("q")


def _set_parent_death_signal(signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
