"""The master: spawn, reap and respawn workers, signals, readiness, idle exit, shutdown.

Single-threaded, so forking is safe at any time. One selector waits on a wakeup socket
(signal.set_wakeup_fd), the workers' event pipe and the nearest deadline; signal
handlers do nothing, and the loop dispatches signal numbers through `self.on_signal`.
The master learns what workers do from the scoreboard and never sees a connection.
Never relays bytes and never starts threads.
"""

import collections
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
from typing import TYPE_CHECKING

from setproctitle import setproctitle

from forkproxy import logs
from forkproxy.errors import ForkproxyError
from forkproxy.relay.splice import check_pipe_size
from forkproxy.relay.targets import check_routes
from forkproxy.relay.worker import run_worker
from forkproxy.settings.config import MAX_WORKERS, Config
from forkproxy.settings.timespan import format_timespan
from forkproxy.shared.admission import Admission
from forkproxy.shared.per_source import SourceLimit, entries_for
from forkproxy.shared.protocol import (
    EVENT_FORMAT,
    EVENT_IDLE,
    EVENT_READY,
    EVENT_SIZE,
    EXIT_CANNOT_START,
    PIPE_POOL_KEEP,
    WorkerSpec,
)
from forkproxy.shared.scoreboard import (
    HEARTBEAT_NS,
    LAST_ACTIVITY_NS,
    PID,
    REFUSED,
    STATE,
    Scoreboard,
    SlotState,
)
from forkproxy.supervisor.activation import (
    INETD_FD,
    METRICS_FD_NAME,
    Listener,
    adopt_listener,
    is_connection,
    passed_fds,
)
from forkproxy.supervisor.listeners import bind_listener, close_listeners
from forkproxy.supervisor.notify import Notifier, watchdog_interval

if TYPE_CHECKING:
    from forkproxy.supervisor.metrics.collector import MetricsEndpoint

log = logging.getLogger("forkproxy")

EXIT_OK = 0
EXIT_FAILURE = 1

# Crash-loop policy: a worker that dies before it has served for STABLE_AFTER seconds
# died "early"; CRASH_LIMIT early deaths within CRASH_WINDOW seconds end the master,
# so systemd's Restart= takes over instead of a fork storm.
STABLE_AFTER = 5.0
CRASH_LIMIT = 5
CRASH_WINDOW = 10.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
KILL_MARGIN = 2.0  # after the graceful timeout, how long before workers are SIGKILLed
STATUS_INTERVAL = 2.0
FD_RESERVE = 2 * PIPE_POOL_KEEP + 32  # descriptors a worker needs besides its connections


class WorkerProcess:
    """The master's record of one live worker process."""

    __slots__ = (
        "slot",
        "pid",
        "generation",
        "started",
        "ready",
        "stopping",
        "killed",
        "kill_deadline",
    )

    def __init__(self, slot: int, pid: int, generation: int) -> None:
        self.slot = slot
        self.pid = pid
        self.generation = generation
        self.started = time.monotonic()
        self.ready = False
        self.stopping = False  # asked to stop: its exit is expected, not replaced
        self.killed = False  # SIGKILLed by us; waiting to be reaped
        self.kill_deadline = math.inf  # SIGKILL if still alive then

    def kill(self) -> None:
        self.killed = True
        self.kill_deadline = math.inf
        _kill(self.pid, signal.SIGKILL)


def run(config: Config) -> int:
    """Run forkproxy until it stops; return the process exit status."""
    logs.setup(config.log_level)
    if config.inetd:
        # StandardInput=socket: a connection (Accept=yes) or a listener (Accept=no).
        if is_connection(INETD_FD):
            return _relay_connection(config, INETD_FD, "standard input (--inetd)")
        passed = [(INETD_FD, "unknown")]
    else:
        passed = passed_fds()
    if len(passed) == 1 and is_connection(passed[0][0]):
        # Accept=yes: systemd accepted the client and passed the connection itself.
        return _relay_connection(config, passed[0][0], f"fd {passed[0][0]} from systemd")
    master = Master(config, passed)
    try:
        return master.run()
    finally:
        master.close()


def _relay_connection(config: Config, fd: int, what: str) -> int:
    # Imported here: the one-shot relay needs uvloop, which a master never loads (the
    # workers it forks load their own, so they do not start with a copy of it).
    from forkproxy.oneshot import relay_connection

    return relay_connection(config, fd, what)


class Master:
    def __init__(self, config: Config, passed: list[tuple[int, str]]) -> None:
        self.config = config
        self.passed = passed  # (fd, name) from systemd, see activation.passed_fds
        self.listeners: list[Listener] = []
        self.workers: dict[int, WorkerProcess] = {}  # by pid
        self.respawn_at: dict[int, float] = {}  # slot -> when to start its replacement
        self.backoff: dict[int, float] = {}  # slot -> delay before its next replacement
        self.early_deaths: collections.deque[float] = collections.deque()
        self.generation = 0
        self.target_workers = config.workers
        self.restarts = 0
        self.ready_notified = False
        self.rotating = False
        self.stopping = False
        self.exit_status = EXIT_OK
        self.shutdown_deadline = math.inf
        self.idle_since = time.monotonic()
        self.status_text = ""
        self.next_status = 0.0
        self.next_watchdog = 0.0
        self.selector: selectors.BaseSelector | None = None
        self.scoreboard: Scoreboard | None = None
        self.admission: Admission | None = None
        self.per_source: SourceLimit | None = None  # issue 6: --max-connections-per-source
        self.wakeup: tuple[socket.socket, socket.socket] | None = None
        self.events: tuple[int, int] | None = None
        # Issue 4: metrics sockets (the master's own: workers close them) and their responder.
        self.metrics_listeners: list[Listener] = []
        self.metrics: MetricsEndpoint | None = None
        self.notifier = Notifier()
        self.watchdog_interval = watchdog_interval()
        self.heartbeat_interval = config.heartbeat_interval
        if self.watchdog_interval is not None:
            self.heartbeat_interval = min(self.heartbeat_interval, self.watchdog_interval / 4)
        self.on_signal: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.on_sigterm,
            signal.SIGINT: self.on_sigterm,
            signal.SIGQUIT: self.on_sigquit,
            signal.SIGCHLD: self.reap,
            signal.SIGHUP: self.on_sighup,
            signal.SIGTTIN: self.on_sigttin,
            signal.SIGTTOU: self.on_sigttou,
        }

    # -- setup ---------------------------------------------------------------------------

    def _setup(self) -> None:
        fd_limit = _raise_fd_limit()
        self.listeners = self._open_listeners()
        # Issue 4: --metrics is bound only if systemd passed no socket named "metrics".
        if self.config.metrics is not None and self.metrics_listeners:
            log.info("systemd passed a '%s' socket: ignoring --metrics", METRICS_FD_NAME)
        elif self.config.metrics is not None:
            self.metrics_listeners = [bind_listener(self.config.metrics, self.config.socket_mode)]
        needed = 2 * self.config.connections_max + FD_RESERVE
        if needed > fd_limit:
            log.warning(
                "--connections-max=%d needs up to %d file descriptors in one worker "
                "(2 per connection, more while data is in flight) but the limit is %d; "
                "connections beyond it will fail (raise LimitNOFILE=)",
                self.config.connections_max,
                needed,
                fd_limit,
            )
        self.scoreboard = Scoreboard(2 * MAX_WORKERS)
        self.admission = Admission(self.config.connections_max)
        # Issue 6: what can only be checked with the listeners and the kernel at hand.
        check_routes(self.config.routes, self.listeners)
        check_pipe_size(self.config.pipe_size)
        if self.config.max_connections_per_source:
            try:
                self.per_source = SourceLimit(
                    self.config.max_connections_per_source,
                    entries_for(self.config.connections_max),
                )
            except OSError as error:
                raise ForkproxyError(
                    f"cannot set up --max-connections-per-source: {error.strerror or error}"
                ) from None
        self.events = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup = socket.socketpair()
        for end in self.wakeup:
            end.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wakeup[0], selectors.EVENT_READ, self._on_wakeup)
        self.selector.register(self.events[0], selectors.EVENT_READ, self._on_worker_events)
        # Issue 4: metrics are served from this loop. prometheus_client is loaded only
        # when there is a metrics socket: every worker forked later starts with a copy.
        if self.metrics_listeners:
            from forkproxy.supervisor.metrics.collector import open_metrics

            self.metrics = open_metrics(
                self.metrics_listeners, self.selector, self, self.scoreboard, self.admission
            )
        signal.set_wakeup_fd(self.wakeup[1].fileno(), warn_on_full_buffer=False)
        for signum in self.on_signal:
            signal.signal(signum, _ignore_signal)
        setproctitle(f"forkproxy: master {self.config.target.text}")

    def _open_listeners(self) -> list[Listener]:
        passed = self.passed
        # Issue 4: a passed socket named "metrics" serves metrics and is never proxied.
        self.metrics_listeners = [
            adopt_listener(fd, name) for fd, name in passed if name == METRICS_FD_NAME
        ]
        passed = [(fd, name) for fd, name in passed if name != METRICS_FD_NAME]
        if passed:
            if self.config.listen:
                log.info("systemd passed %d sockets: ignoring --listen", len(passed))
            return [adopt_listener(fd, name) for fd, name in passed]
        if not self.config.listen:
            raise ForkproxyError(
                "no sockets passed in by systemd (LISTEN_FDS) and no --listen address given"
            )
        listeners: list[Listener] = []
        try:
            for address in self.config.listen:
                listeners.append(bind_listener(address, self.config.socket_mode))
        except ForkproxyError:
            close_listeners(listeners)
            raise
        return listeners

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> int:
        self._setup()
        assert self.selector is not None
        log.info(
            "relaying %s to %s with %d workers, at most %d connections",
            ", ".join(listener.label for listener in self.listeners),
            ", ".join(target.text for target in self.config.targets),
            self.target_workers,
            self.config.connections_max,
        )
        self.notifier.status(f"starting {self.target_workers} workers")
        gc.freeze()  # keep the heap's pages shared with workers after fork
        for slot in range(self.target_workers):
            self._spawn(slot)
        while not (self.stopping and not self.workers):
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
        if self.metrics is not None:  # issue 4: its clients, then the metrics listeners
            self.metrics.close()
        close_listeners(self.metrics_listeners)
        if self.admission is not None:
            self.admission.remove()
        if self.per_source is not None:  # issue 6
            self.per_source.remove()
            self.per_source.close()
        if self.scoreboard is not None:
            self.scoreboard.close()
        self.notifier.close()

    def _on_wakeup(self) -> None:
        assert self.wakeup is not None
        try:
            data = self.wakeup[0].recv(256)
        except BlockingIOError:
            return
        for signum in data:
            handler = self.on_signal.get(signum)
            if handler is not None:
                handler()

    def _on_worker_events(self) -> None:
        assert self.events is not None and self.scoreboard is not None
        try:
            data = os.read(self.events[0], 64 * EVENT_SIZE)
        except BlockingIOError:
            return
        by_slot = {worker.slot: worker for worker in self.workers.values()}
        for slot, event in struct.iter_unpack(EVENT_FORMAT, data):
            worker = by_slot.get(slot)
            if worker is None or self.scoreboard.get(slot, PID) != worker.pid:
                continue  # from a worker already gone
            if event == EVENT_READY:
                worker.ready = True
                self._on_worker_ready()
            elif event == EVENT_IDLE:
                pass  # the idle deadline is recomputed after every wakeup

    def _next_deadline(self) -> float:
        deadlines = [self.shutdown_deadline, self._idle_deadline()]
        deadlines.extend(self.respawn_at.values())
        for worker in self.workers.values():
            deadlines.append(worker.kill_deadline)
            deadlines.append(self._heartbeat_deadline(worker))
        if self.watchdog_interval is not None:
            deadlines.append(self.next_watchdog)
        if self.notifier.enabled:
            deadlines.append(self.next_status)
        if self.metrics is not None:  # issue 4: metrics clients' deadlines
            deadlines.append(self.metrics.next_deadline())
        return min(deadlines)

    def _run_deadlines(self) -> None:
        now = time.monotonic()
        if self.metrics is not None:  # issue 4: drop metrics clients past their deadline
            self.metrics.run_deadlines(now)
        if now >= self.shutdown_deadline:
            self._kill_all("graceful timeout passed")
            self.shutdown_deadline = math.inf
        for slot, when in list(self.respawn_at.items()):
            if now >= when:
                del self.respawn_at[slot]
                self.restarts += 1
                self._spawn(slot)
        for worker in list(self.workers.values()):
            if now >= worker.kill_deadline:
                log.warning(
                    "worker %d (pid %d) did not stop within %s, killing it",
                    worker.slot,
                    worker.pid,
                    format_timespan(self.config.graceful_timeout),
                )
                worker.kill()
            elif now >= self._heartbeat_deadline(worker):
                log.warning(
                    "worker %d (pid %d) has not run its event loop for %s, killing it",
                    worker.slot,
                    worker.pid,
                    format_timespan(self.config.worker_timeout),
                )
                worker.kill()
        if now >= self._idle_deadline():
            self.begin_shutdown(
                EXIT_OK, f"no connections for {format_timespan(self.config.exit_idle_time)}"
            )
        if self.watchdog_interval is not None and now >= self.next_watchdog:
            if self._heartbeats_fresh(now):
                self.notifier.watchdog()
            self.next_watchdog = now + self.watchdog_interval / 2
        if self.notifier.enabled and now >= self.next_status:
            self._update_status()
            self.next_status = now + STATUS_INTERVAL

    # -- workers -------------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        assert self.scoreboard is not None and self.admission is not None
        assert self.events is not None
        self.scoreboard.prepare(slot, self.generation, time.monotonic_ns())
        spec = WorkerSpec(
            config=self.config,
            slot=slot,
            generation=self.generation,
            listeners=tuple(self.listeners),
            scoreboard=self.scoreboard,
            admission=self.admission,
            events_fd=self.events[1],
            master_pid=os.getpid(),
            heartbeat_interval=self.heartbeat_interval,
            per_source=self.per_source,
        )
        # Signals stay blocked across fork: a signal for the new worker must neither run
        # the master's handler in it (which would report it on the master's wakeup fd) nor
        # be lost; the worker unblocks once its own loop handles them.
        signal.pthread_sigmask(signal.SIG_BLOCK, self.on_signal)
        try:
            pid = os.fork()
        except OSError as error:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.on_signal)
            log.error("cannot start worker %d: %s", slot, error)
            self._schedule_respawn(slot, early=True)
            return
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.on_signal)
        else:
            status = 70  # EX_SOFTWARE: a bug escaped the worker
            try:
                self._drop_master_resources()
                status = run_worker(spec)
            except BaseException:
                log.exception("worker %d crashed", slot)
            finally:
                os._exit(status)
        self.workers[pid] = WorkerProcess(slot, pid, self.generation)
        log.debug("started worker %d (pid %d)", slot, pid)

    def _drop_master_resources(self) -> None:
        """In a new worker: close what only the master uses."""
        assert self.selector is not None and self.wakeup is not None and self.events is not None
        signal.set_wakeup_fd(-1)
        self.selector.close()
        for end in self.wakeup:
            end.close()
        os.close(self.events[0])
        self.notifier.close()
        if self.metrics is not None:  # issue 4: the metrics sockets are the master's
            self.metrics.close()
        for listener in self.metrics_listeners:
            listener.sock.close()  # our copy only: never unlink the master's socket file

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:  # other children are reaped quietly
                self._on_worker_exit(worker, status)

    def _on_worker_exit(self, worker: WorkerProcess, status: int) -> None:
        assert self.scoreboard is not None
        self.idle_since = time.monotonic()  # its connections, if any, just ended
        self.scoreboard.retire(worker.slot)
        how = _describe_exit(status)
        if self.stopping or worker.stopping:
            log.debug("worker %d (pid %d) %s", worker.slot, worker.pid, how)
            return
        if os.waitstatus_to_exitcode(status) == EXIT_CANNOT_START:
            log.error("worker %d could not start, stopping", worker.slot)
            self.begin_shutdown(EXIT_FAILURE, "a worker could not start")
            return
        now = time.monotonic()
        early = not worker.ready or now - worker.started < STABLE_AFTER
        if early:
            self.early_deaths.append(now)
            while self.early_deaths and self.early_deaths[0] < now - CRASH_WINDOW:
                self.early_deaths.popleft()
            if len(self.early_deaths) >= CRASH_LIMIT:
                log.error(
                    "workers keep dying (%d deaths within %gs of starting, last: worker %d %s), "
                    "giving up",
                    len(self.early_deaths),
                    CRASH_WINDOW,
                    worker.slot,
                    how,
                )
                self.begin_shutdown(EXIT_FAILURE, "workers keep dying")
                return
        if worker.generation != self.generation:
            log.warning("worker %d (pid %d) %s", worker.slot, worker.pid, how)
            return  # a rotation is replacing it already
        log.warning("worker %d (pid %d) %s, starting a replacement", worker.slot, worker.pid, how)
        self._schedule_respawn(worker.slot, early)

    def _schedule_respawn(self, slot: int, early: bool) -> None:
        if early:
            delay = min(BACKOFF_MAX, self.backoff.get(slot, BACKOFF_FIRST / 2) * 2)
            self.backoff[slot] = delay
        else:
            delay = 0.0
            self.backoff.pop(slot, None)
        self.respawn_at[slot] = time.monotonic() + delay

    def _on_worker_ready(self) -> None:
        if self.stopping:
            return
        current = [w for w in self.workers.values() if w.generation == self.generation]
        if len(current) < self.target_workers or not all(w.ready for w in current):
            return
        if self.rotating:
            self.rotating = False
            old = [w for w in self.workers.values() if w.generation != self.generation]
            log.info("new workers serving; stopping %d old workers", len(old))
            for worker in old:
                self._stop_worker(worker)
        if not self.ready_notified:
            self.ready_notified = True
            self.idle_since = time.monotonic()
            log.info("ready: %d workers serving", len(current))
            self.notifier.ready(self._status_line())
        self._update_status()

    def _stop_worker(self, worker: WorkerProcess) -> None:
        """Ask one worker to stop accepting and drain; kill it if it takes too long."""
        worker.stopping = True
        worker.kill_deadline = time.monotonic() + self.config.graceful_timeout + KILL_MARGIN
        _kill(worker.pid, signal.SIGTERM)

    def _heartbeat_deadline(self, worker: WorkerProcess) -> float:
        if worker.killed:
            return math.inf
        assert self.scoreboard is not None
        beat = self.scoreboard.get(worker.slot, HEARTBEAT_NS) / 1e9
        return beat + self.config.worker_timeout

    def _heartbeats_fresh(self, now: float) -> bool:
        assert self.scoreboard is not None
        stale_before = now - 3 * self.heartbeat_interval
        return all(
            self.scoreboard.get(worker.slot, HEARTBEAT_NS) / 1e9 >= stale_before
            for worker in self.workers.values()
            if not worker.killed
        )

    # -- idle exit and status ------------------------------------------------------------

    def _idle_deadline(self) -> float:
        """When to exit for --exit-idle-time, or inf while connections are open."""
        if math.isinf(self.config.exit_idle_time) or self.stopping or not self.ready_notified:
            return math.inf
        assert self.admission is not None and self.scoreboard is not None
        if self.admission.in_use():
            return math.inf  # workers report EVENT_IDLE when their last connection ends
        last = self.idle_since
        for worker in self.workers.values():
            last = max(last, self.scoreboard.get(worker.slot, LAST_ACTIVITY_NS) / 1e9)
        return last + self.config.exit_idle_time

    def _status_line(self) -> str:
        assert self.admission is not None and self.scoreboard is not None
        serving = sum(
            1
            for worker in self.workers.values()
            if self.scoreboard.get(worker.slot, STATE) == SlotState.SERVING
        )
        return (
            f"{serving} workers, {self.admission.in_use()} active, "
            f"{self.scoreboard.total(REFUSED)} refused"
        )

    def _update_status(self) -> None:
        if self.stopping or not self.notifier.enabled:
            return
        text = self._status_line()
        if text != self.status_text:
            self.status_text = text
            self.notifier.status(text)

    # -- signals and shutdown ------------------------------------------------------------

    def on_sigterm(self) -> None:
        if self.stopping:
            self._kill_all("asked again to stop")
        else:
            self.begin_shutdown(EXIT_OK, "asked to stop")

    def on_sigquit(self) -> None:
        self.begin_shutdown(EXIT_OK, "asked to stop at once")
        self._kill_all("asked to stop at once")

    def on_sighup(self) -> None:
        """Graceful rotation: a new generation starts; the old one drains once it serves."""
        if self.stopping:
            return
        self.generation += 1
        self.rotating = True
        self.respawn_at.clear()
        log.info("rotating workers: starting %d new workers", self.target_workers)
        free = self._free_slots()
        for slot in free[: self.target_workers]:
            self._spawn(slot)

    def on_sigttin(self) -> None:
        if self.stopping:
            return
        free = self._free_slots()
        if self.target_workers >= MAX_WORKERS or not free:
            log.warning("already at the most workers (%d), ignoring SIGTTIN", MAX_WORKERS)
            return
        self.target_workers += 1
        log.info("adding a worker: %d workers", self.target_workers)
        self._spawn(free[0])

    def on_sigttou(self) -> None:
        if self.stopping:
            return
        if self.target_workers <= 1:
            log.warning("already at one worker, ignoring SIGTTOU")
            return
        self.target_workers -= 1
        current = [
            w for w in self.workers.values() if w.generation == self.generation and not w.stopping
        ]
        pending = [slot for slot in self.respawn_at]
        if pending:
            del self.respawn_at[max(pending)]
        elif current:
            self._stop_worker(max(current, key=lambda w: w.slot))
        log.info("removing a worker: %d workers", self.target_workers)

    def _free_slots(self) -> list[int]:
        assert self.scoreboard is not None
        used = {worker.slot for worker in self.workers.values()} | set(self.respawn_at)
        return [slot for slot in range(self.scoreboard.slot_count) if slot not in used]

    def begin_shutdown(self, status: int, reason: str) -> None:
        """Stop accepting everywhere and let connections finish (bounded)."""
        if self.stopping:
            return
        self.stopping = True
        self.exit_status = status
        self.notifier.stopping(reason)
        log.info("stopping: %s", reason)
        self.respawn_at.clear()
        self.shutdown_deadline = time.monotonic() + self.config.graceful_timeout + KILL_MARGIN
        for worker in self.workers.values():
            if not worker.stopping:
                worker.stopping = True
                _kill(worker.pid, signal.SIGTERM)

    def _kill_all(self, reason: str) -> None:
        if self.workers:
            log.warning("%s: killing %d workers", reason, len(self.workers))
        for worker in self.workers.values():
            worker.kill()


def _ignore_signal(signum: int, frame: object) -> None:
    """Python-level handler: the wakeup fd carries the signal to the master loop."""


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # already dead, not yet reaped


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"was killed by signal {signum} ({name})"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one, as systemd expects daemons to."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as nr_open:
                hard = int(nr_open.read())
        except (OSError, ValueError):
            return soft
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as error:
            log.warning("cannot raise the file descriptor limit to %d: %s", hard, error)
    return soft
