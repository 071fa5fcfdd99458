"""The master: set-up, the selector loop, the signal table, shutdown.

Single-threaded, so forking is safe at any time. One selector waits on a wakeup socket
(signal.set_wakeup_fd), the workers' event pipe, the metrics sockets and the nearest
deadline; signal handlers do nothing, and the loop dispatches signal numbers through
`self.on_signal`. Its workers are `workers.WorkerPool`'s, what it tells systemd is
`readiness.Readiness`'s. The master learns what workers do from the scoreboard and never
sees a connection. Never relays bytes and never starts threads.
"""

import errno
import gc
import logging
import math
import os
import resource
import selectors
import signal
import socket
import struct
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from setproctitle import setproctitle

from forkproxy.errors import ForkproxyError, UsageErrors
from forkproxy.relay.access_log import check_access_logs
from forkproxy.relay.splice import check_pipe_size
from forkproxy.settings.config import Config, ListenerSettings
from forkproxy.settings.timespan import format_timespan
from forkproxy.shared.admission import Admission
from forkproxy.shared.layout import mapping_bytes, source_entries
from forkproxy.shared.listener import Listener
from forkproxy.shared.mapping import SharedMapping
from forkproxy.shared.protocol import EVENT_FORMAT, EVENT_READY, EVENT_SIZE, WorkerSpec
from forkproxy.shared.scoreboard import Scoreboard
from forkproxy.supervisor.activation import METRICS_FD_NAME
from forkproxy.supervisor.check import listener_problems
from forkproxy.supervisor.health import Checker
from forkproxy.supervisor.limits import check_fd_limit, raise_fd_limit
from forkproxy.supervisor.listeners import bind_listener, close_listeners, open_listeners
from forkproxy.supervisor.notify import Notifier, watchdog_interval
from forkproxy.supervisor.readiness import Readiness
from forkproxy.supervisor.reopen import reopen_access_logs
from forkproxy.supervisor.routes import startup_line
from forkproxy.supervisor.signals import MASTER_SIGNALS, STOP_SIGNALS, UNUSED_SIGNALS
from forkproxy.supervisor.target_rows import TargetRows
from forkproxy.supervisor.workers import KILL_MARGIN, WorkerPool

if TYPE_CHECKING:
    from forkproxy.supervisor.metrics.endpoint import MetricsEndpoint

log = logging.getLogger("forkproxy")

EXIT_OK = 0
EXIT_FAILURE = 1


class Master:
    # Made in `_setup` with the resources they work on; the loop runs only after it.
    pool: WorkerPool
    readiness: Readiness

    def __init__(self, config: Config, passed: list[tuple[int, str]]) -> None:
        self.config = config
        self.passed = passed  # (fd, name) from systemd, see activation.passed_fds
        self.listeners: list[Listener] = []
        self.exit_status = EXIT_OK
        self.shutdown_deadline = math.inf
        self.selector: selectors.BaseSelector | None = None
        self.mapping: SharedMapping | None = None  # scoreboard and caps; ours to close
        self.scoreboard: Scoreboard | None = None
        self.admission: Admission | None = None
        self.targets: TargetRows | None = None  # the target table's rows of the settings
        self.checker: Checker | None = None  # active health checks (supervisor/health.py)
        self.wakeup: tuple[socket.socket, socket.socket] | None = None
        self.events: tuple[int, int] | None = None
        # Metrics sockets (the master's own: workers close them) and their responder.
        self.metrics_listeners: list[Listener] = []
        self.metrics: MetricsEndpoint | None = None
        self.notifier = Notifier()
        self.watchdog_interval = watchdog_interval()
        self.heartbeat_interval = config.heartbeat_interval
        if self.watchdog_interval is not None:
            self.heartbeat_interval = min(self.heartbeat_interval, self.watchdog_interval / 4)
        self.listeners_bound = False  # from --listen: ours to close and unlink
        self.on_signal: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.on_sigterm,
            signal.SIGINT: self.on_sigterm,
            signal.SIGQUIT: self.on_sigquit,
            signal.SIGCHLD: lambda: self.pool.reap(),
            signal.SIGHUP: lambda: self.pool.rotate(),  # graceful rotation of all workers
            signal.SIGTTIN: self.on_sigttin,
            signal.SIGTTOU: self.on_sigttou,
            # The workers reopen their access-log files (supervisor/reopen.py).
            signal.SIGUSR1: lambda: reopen_access_logs(self.config, self.pool.workers.values()),
            signal.SIGUSR2: self.on_sigusr2,
        }
        for signum in UNUSED_SIGNALS:
            self.on_signal[signum] = partial(self.on_unused_signal, signum)
        self.unused_logged: set[int] = set()
        assert set(self.on_signal) == MASTER_SIGNALS

    # -- setup ---------------------------------------------------------------------------

    def _setup(self) -> None:
        fd_limit = raise_fd_limit()
        self.listeners, self.metrics_listeners, self.listeners_bound = open_listeners(
            self.config, self.passed
        )
        # --metrics is bound only if systemd passed no socket named "metrics".
        if self.config.metrics is not None and self.metrics_listeners:
            log.info("systemd passed a '%s' socket: ignoring --metrics", METRICS_FD_NAME)
        elif self.config.metrics is not None:
            self.metrics_listeners = [bind_listener(self.config.metrics, self.config.socket_mode)]
        check_fd_limit(fd_limit, self.config.connections_max)
        check_access_logs(self.config)  # each worker opens them: can it?
        # What can only be checked with the listeners and the kernel at hand.
        problems = listener_problems(
            self.config, [(one.name, one.label, one.kind) for one in self.listeners]
        )
        if problems:
            raise UsageErrors(problems)
        for size in {self._settings(listener).pipe_size for listener in self.listeners}:
            check_pipe_size(size)
        self.mapping = _shared_mapping(self.config)
        self.scoreboard = Scoreboard(self.mapping, len(self.listeners))
        self.admission = Admission.set_up(
            self.mapping, self.config.connections_max, _source_limit(self.config)
        )
        self.targets = targets = TargetRows.set_up(
            self.config, self.listeners, self.mapping, self.scoreboard
        )
        self.events = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup = socket.socketpair()
        for end in self.wakeup:
            end.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wakeup[0], selectors.EVENT_READ, self._on_wakeup)
        self.selector.register(self.events[0], selectors.EVENT_READ, self._on_worker_events)
        self.checker = Checker(self.selector, targets, self.mapping)
        spec = WorkerSpec(
            config=self.config,
            slot=0,
            generation=0,
            listeners=tuple(self.listeners),
            scoreboard=self.scoreboard,
            admission=self.admission,
            events_fd=self.events[1],
            master_pid=os.getpid(),
            heartbeat_interval=self.heartbeat_interval,
            targets=targets.table,
            listener_targets=targets.by_listener,
        )
        self.pool = WorkerPool(spec, self.on_signal, self._drop_master_resources, self._on_fatal)
        self.readiness = Readiness(
            self.config,
            self.notifier,
            self.watchdog_interval,
            self.pool,
            self.scoreboard,
            self.admission,
            targets,
        )
        # Metrics are served from this loop. prometheus_client is loaded only when there
        # is a metrics socket: every worker forked later starts with a copy.
        if self.metrics_listeners:
            from forkproxy.supervisor.metrics.endpoint import open_metrics

            self.metrics = open_metrics(
                self.metrics_listeners,
                self.selector,
                self.pool,
                self.scoreboard,
                self.admission,
                targets=(targets, self.checker),
                start_timeout=self.config.worker_timeout,  # how long a worker may take
            )
        signal.set_wakeup_fd(self.wakeup[1].fileno(), warn_on_full_buffer=False)
        for signum in self.on_signal:
            signal.signal(signum, _ignore_signal)
        setproctitle(f"forkproxy: master {self._settings(self.listeners[0]).targets[0].text}")

    def _settings(self, listener: Listener) -> ListenerSettings:
        return self.config.settings_for(listener.name)

    def _drop_master_resources(self) -> None:
        """In a new worker: close what only the master uses."""
        assert self.selector is not None and self.wakeup is not None and self.events is not None
        signal.set_wakeup_fd(-1)
        self.selector.close()
        for end in self.wakeup:
            end.close()
        os.close(self.events[0])
        self.notifier.close()
        if self.metrics is not None:  # the metrics sockets are the master's
            self.metrics.close()
        if self.checker is not None:  # the master's checks' sockets and pipes
            self.checker.close()
        for listener in self.metrics_listeners:
            listener.sock.close()  # our copy only: never unlink the master's socket file

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> int:
        # The signals the loop handles wait until it does: during set-up, a SIGHUP or a
        # SIGUSR1 would end the master (their default action), a SIGTERM leave what set-up
        # made so far behind. Left blocked if set-up fails: the master then exits anyway.
        signal.pthread_sigmask(signal.SIG_BLOCK, self.on_signal)
        try:
            self._setup()
        except OSError as error:  # out of descriptors or memory: before any worker runs
            raise ForkproxyError(f"cannot start: {_describe(error)}") from None
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.on_signal)
        assert self.selector is not None
        routes = [(one, self._settings(one).targets) for one in self.listeners]
        log.info("%s", startup_line(routes, self.pool.target_workers, self.config.connections_max))
        self.notifier.status(f"starting {self.pool.target_workers} workers")
        gc.freeze()  # keep the heap's pages shared with workers after fork
        self.pool.start()
        while not (self.pool.stopping and not self.pool.workers):
            timeout = self._next_deadline() - time.monotonic()
            for key, _ in self.selector.select(None if math.isinf(timeout) else max(0.0, timeout)):
                key.data()
            self._run_deadlines()
        log.info("stopped")
        return self.exit_status

    def close(self) -> None:
        """Release what the master holds; safe after a failed setup."""
        signal.set_wakeup_fd(-1)
        if self.selector is not None:
            self.selector.close()
        if self.wakeup is not None:
            for end in self.wakeup:
                end.close()
        if self.events is not None:
            for fd in self.events:
                os.close(fd)
        close_listeners(self.listeners)
        if self.metrics is not None:  # its clients, then the metrics listeners
            self.metrics.close()
        close_listeners(self.metrics_listeners)
        if self.checker is not None:
            self.checker.close()
        if self.targets is not None:
            self.targets.close()
        if self.scoreboard is not None:
            self.scoreboard.close()
        if self.mapping is not None:
            self.mapping.close()
        self.notifier.close()

    def _on_wakeup(self) -> None:
        assert self.wakeup is not None
        received = bytearray()
        while True:  # all of it: a full wakeup socket would drop signals
            try:
                data = self.wakeup[0].recv(4096)
            except BlockingIOError:
                break
            if not data:
                break
            received += data
        for signum in sorted(received, key=_dispatch_rank):
            handler = self.on_signal.get(signum)
            if handler is not None:
                handler()

    def _on_worker_events(self) -> None:
        assert self.events is not None
        try:
            data = os.read(self.events[0], 64 * EVENT_SIZE)
        except BlockingIOError:
            return
        for slot, event in struct.iter_unpack(EVENT_FORMAT, data):
            # EVENT_IDLE needs nothing: the idle deadline is recomputed after every wakeup.
            if event == EVENT_READY and self.pool.mark_ready(slot):
                self.readiness.on_serving()

    def _next_deadline(self) -> float:
        deadline = min(
            self.shutdown_deadline, self.readiness.next_deadline(), self.pool.next_deadline()
        )
        if self.metrics is not None:  # metrics clients' deadlines
            deadline = min(deadline, self.metrics.next_deadline())
        if self.checker is not None:  # active health checks
            deadline = min(deadline, self.checker.next_deadline())
        return deadline

    def _run_deadlines(self) -> None:
        now = time.monotonic()
        if self.metrics is not None:  # drop metrics clients past their deadline
            self.metrics.run_deadlines(now)
        if now >= self.shutdown_deadline:
            self.pool.kill_all("graceful timeout passed")
            self.shutdown_deadline = math.inf
        self.pool.run_deadlines(now)
        if self.checker is not None:
            self.checker.run_deadlines(now)
        if now >= self.readiness.idle_deadline():
            self.begin_shutdown(
                EXIT_OK, f"no connections for {format_timespan(self.config.exit_idle_time)}"
            )
        self.readiness.run_deadlines(now)

    # -- signals and shutdown ------------------------------------------------------------

    def on_sigterm(self) -> None:
        if self.pool.stopping:
            self.pool.kill_all("asked again to stop")
        else:
            self.begin_shutdown(EXIT_OK, "asked to stop")

    def on_sigquit(self) -> None:
        self.begin_shutdown(EXIT_OK, "asked to stop at once")
        self.pool.kill_all("asked to stop at once")

    def on_sigttin(self) -> None:
        if self.pool.add_worker():
            self.readiness.on_serving()

    def on_sigttou(self) -> None:
        if self.pool.remove_worker():  # the last one not yet serving may have gone
            self.readiness.on_serving()

    def on_sigusr2(self) -> None:
        log.warning("SIGUSR2 is kept for reloading, ignoring it")  # TODO(#17): reload

    def on_unused_signal(self, signum: int) -> None:
        if signum not in self.unused_logged:
            self.unused_logged.add(signum)
            log.info("ignoring %s (logged once)", signal.Signals(signum).name)

    def _on_fatal(self, reason: str) -> None:
        self.begin_shutdown(EXIT_FAILURE, reason)

    def begin_shutdown(self, status: int, reason: str) -> None:
        """Stop accepting everywhere and let connections finish (bounded)."""
        if self.pool.stopping:
            return
        self.exit_status = status
        self.notifier.stopping(reason)
        log.info("stopping: %s", reason)
        self.shutdown_deadline = time.monotonic() + self.config.graceful_timeout + KILL_MARGIN
        self.pool.stop_all()
        if self.listeners_bound:
            # The workers close their copies as they stop; once ours is closed too, new
            # clients are refused at once instead of waiting in a backlog nobody accepts
            # from. Sockets systemd passed stay open in systemd, whose backlog keeps such
            # clients for the next start.
            close_listeners(self.listeners)
            self.listeners = []


def _source_limit(config: Config) -> int:
    """The highest --connections-max-per-source of any listener (0: no limit anywhere).

    One table counts a source across listeners; each listener admits against its own
    limit (Admitter.admit), this one is the table's, for the metrics."""
    return max(
        [config.connections_max_per_source]
        + [settings.connections_max_per_source for settings in config.listeners]
    )


def _shared_mapping(config: Config) -> SharedMapping:
    """The memfd mapping shared with every worker (shared/mapping.py)."""
    entries = source_entries(config.connections_max)
    try:
        return SharedMapping.create(entries)
    except OSError as error:
        size = mapping_bytes(entries) >> 20
        raise ForkproxyError(
            f"cannot create the shared memory ({size} MiB): {_describe(error)}"
        ) from None


def _dispatch_rank(signum: int) -> int:
    """Order of handling within one wakeup: stops, then the rest, then SIGCHLD."""
    if signum in STOP_SIGNALS:
        return 0
    return 2 if signum == signal.SIGCHLD else 1


def _describe(error: OSError) -> str:
    """An OSError of set-up as the end of a one-line message."""
    text = error.strerror or str(error)
    if error.errno in (errno.EMFILE, errno.ENFILE):
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        text += f" (the file descriptor limit is {limit}; raise LimitNOFILE= or ulimit -n)"
    return text


def _ignore_signal(signum: int, frame: object) -> None:
    """Python-level handler: the wakeup fd carries the signal to the master loop."""
