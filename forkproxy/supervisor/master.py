"""The master: set-up, the selector loop, the signal table, shutdown.

Single-threaded, so forking is safe at any time. One selector waits on a wakeup socket
(`signals.SignalWakeup`), the workers' event pipe, the metrics sockets, a reload's check
and the nearest deadline; signal handlers do nothing, and the loop dispatches signal
numbers through `self.on_signal`. What it holds is `resources.Resources`', its workers
`pool.WorkerPool`'s, what it tells systemd `readiness.Readiness`'s, a reload
`reload.Reloader`'s (and, in the image a reload started, `takeover.Takeover`'s). The
master learns what workers do from the scoreboard and never sees a connection. Never
relays bytes and never starts threads.
"""

import gc
import logging
import math
import selectors
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from setproctitle import setproctitle

from forkproxy.errors import ForkproxyError
from forkproxy.settings.config import Config
from forkproxy.settings.timespan import format_timespan
from forkproxy.shared.protocol import EVENT_READY, WorkerSpec
from forkproxy.supervisor.notify import Notifier, notify_environment, watchdog_interval
from forkproxy.supervisor.pool import WorkerPool
from forkproxy.supervisor.readiness import Readiness
from forkproxy.supervisor.reexec_state import ReexecState
from forkproxy.supervisor.reload import Reloader
from forkproxy.supervisor.reopen import reopen_access_logs
from forkproxy.supervisor.resources import Resources, describe, source_limit
from forkproxy.supervisor.routes import startup_line
from forkproxy.supervisor.signals import MASTER_SIGNALS, SignalWakeup, unused_signal_table

# At start, like everything a reload runs: by the time of a reload, the files may be
# another version's (an upgrade), and this image must not import a mix.
from forkproxy.supervisor.takeover import Takeover, snapshot
from forkproxy.supervisor.target_health import TargetHealth
from forkproxy.supervisor.workers import KILL_MARGIN

if TYPE_CHECKING:
    from forkproxy.supervisor.metrics.endpoint import MetricsEndpoint

log = logging.getLogger("forkproxy")

EXIT_OK = 0
EXIT_FAILURE = 1


class Master:
    # Made in `_setup` with the resources they work on; the loop runs only after it.
    pool: WorkerPool
    readiness: Readiness
    reloader: Reloader
    targets: TargetHealth

    def __init__(
        self,
        config: Config,
        passed: list[tuple[int, str]],
        argv: list[str] | None = None,
        config_text: str | None = None,
        takeover: "Takeover | None" = None,
    ) -> None:
        self.config = config
        self.passed = passed  # (fd, name) from systemd, see activation.passed_fds
        self.argv = list(argv or [])  # as given, for a reload to run again
        self.config_text = config_text  # the --config file this runs with
        self.takeover = takeover
        self.resources = takeover.resources if takeover is not None else Resources()
        self.exit_status = EXIT_OK
        self.shutdown_deadline = math.inf
        self.selector: selectors.BaseSelector | None = None
        self.wakeup: SignalWakeup | None = None
        self.metrics: MetricsEndpoint | None = None  # the responder on the metrics sockets
        self.notify_environment = notify_environment()  # before the Notifier takes it
        self.notifier = Notifier()
        self.watchdog_interval = watchdog_interval()
        self.on_signal: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.on_sigterm,
            signal.SIGINT: self.on_sigterm,
            signal.SIGQUIT: self.on_sigquit,
            signal.SIGCHLD: lambda: self.pool.reap(),
            signal.SIGHUP: lambda: self.reloader.request(signal.SIGHUP),
            signal.SIGTTIN: self.on_sigttin,
            signal.SIGTTOU: self.on_sigttou,
            # The workers reopen their access-log files (supervisor/reopen.py).
            signal.SIGUSR1: lambda: reopen_access_logs(self.config, self.pool.workers.values()),
            signal.SIGUSR2: lambda: self.reloader.request(signal.SIGUSR2),  # HAProxy's reload
        }
        self.on_signal.update(unused_signal_table())
        assert set(self.on_signal) == MASTER_SIGNALS

    # -- setup ---------------------------------------------------------------------------

    def _setup(self) -> None:
        resources = self.resources
        if self.takeover is None:
            resources.start(self.config, self.passed)
        scoreboard, admission = resources.scoreboard, resources.admission
        mapping, events = resources.mapping, resources.events
        assert scoreboard is not None and admission is not None
        assert mapping is not None and events is not None
        # -c applies to every worker at once, old and new: CAPACITY is read at each admit.
        admission.set_limits(self.config.connections_max, source_limit(self.config))
        self.wakeup = SignalWakeup(self.on_signal)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wakeup.read_end, selectors.EVENT_READ, self.wakeup.dispatch)
        self.selector.register(events[0], selectors.EVENT_READ, self._on_worker_events)
        # After a reload, the pairs kept find their rows and health in the mapping.
        self.targets = TargetHealth.set_up(
            self.config, resources.listeners, self.selector, mapping, scoreboard
        )
        self.pool = WorkerPool(
            self.worker_spec(self.config),
            self.on_signal,
            self._drop_master_resources,
            self._on_fatal,
        )
        self.reloader = Reloader(
            self, self.selector, self.notifier, self.argv, self.notify_environment
        )
        self.pool.on_other_exit = self.reloader.on_child_exit
        if self.takeover is not None:
            self.takeover.hand_over(self.pool, self.reloader)
        self.readiness = Readiness(
            self.config,
            self.notifier,
            self.watchdog_interval,
            self.pool,
            scoreboard,
            admission,
            self.targets,
        )
        # Metrics are served from this loop.
        self.metrics = _serve_metrics(self) if resources.metrics_listeners else None
        self.wakeup.install()
        first = self.config.settings_for(resources.listeners[0].name)
        setproctitle(f"forkproxy: master {first.targets[0].text}")

    def worker_spec(self, config: Config) -> WorkerSpec:
        heartbeat_interval = config.heartbeat_interval
        if self.watchdog_interval is not None:
            heartbeat_interval = min(heartbeat_interval, self.watchdog_interval / 4)
        return self.resources.worker_spec(config, heartbeat_interval, self.targets.rows)

    def _drop_master_resources(self) -> None:
        """In a new worker: close what only the master uses."""
        assert self.selector is not None and self.wakeup is not None
        self.wakeup.close()
        self.selector.close()
        self.reloader.close_in_child()
        self.notifier.close()
        if self.metrics is not None:  # the metrics sockets are the master's
            self.metrics.close()
        self.targets.close_in_worker()
        self.resources.close_in_worker()

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> int:
        # The signals the loop handles wait until it does: during set-up, a SIGHUP or a
        # SIGUSR1 would end the master (their default action), a SIGTERM leave what set-up
        # made so far behind. Left blocked if set-up fails: the master then exits anyway.
        signal.pthread_sigmask(signal.SIG_BLOCK, self.on_signal)
        try:
            self._setup()
        except OSError as error:  # out of descriptors or memory: before any worker runs
            raise ForkproxyError(f"cannot start: {describe(error)}") from None
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.on_signal)
        assert self.selector is not None
        # Where clients go, as it starts (and as a reload's new image takes over).
        resources = self.resources
        routes = [(one, self.config.settings_for(one.name).targets) for one in resources.listeners]
        log.info("%s", startup_line(routes, self.pool.target_workers, self.config.connections_max))
        self.notifier.status(f"starting {self.pool.target_workers} workers")
        gc.freeze()  # keep the heap's pages shared with workers after fork
        if self.takeover is not None:
            self.pool.reap()  # workers that ended while the new image started
        if self.pool.start():  # the previous image's workers, kept by a failed reload
            self.on_serving()
        while not (self.pool.stopping and not self.pool.workers and not self.reloader.busy):
            timeout = self._next_deadline() - time.monotonic()
            for key, _ in self.selector.select(None if math.isinf(timeout) else max(0.0, timeout)):
                key.data()
            self._run_deadlines()
        log.info("stopped")
        return self.exit_status

    def close(self) -> None:
        """Release what the master holds; safe after a failed setup."""
        if self.wakeup is not None:
            self.wakeup.close()
        if self.selector is not None:
            self.selector.close()
        if self.metrics is not None:  # its clients; the metrics listeners go with the rest
            self.metrics.close()
        if hasattr(self, "targets"):  # made in set-up, with the mapping
            self.targets.close()
        self.resources.close()
        self.notifier.close()

    def _on_worker_events(self) -> None:
        for slot, event in self.resources.read_events():
            # EVENT_IDLE needs nothing: the idle deadline is recomputed after every wakeup.
            if event == EVENT_READY and self.pool.mark_ready(slot):
                self.on_serving()

    def on_serving(self) -> None:
        """Every current worker serves: READY, the old generation told to drain (by the
        pool), the listeners a reload dropped closed, a waiting reload started."""
        self.readiness.on_serving()
        if self.pool.generation_serving:
            self.resources.close_retiring()
        self.reloader.on_serving()

    def _next_deadline(self) -> float:
        deadline = min(
            self.shutdown_deadline,
            self.readiness.next_deadline(),
            self.pool.next_deadline(),
            self.reloader.next_deadline(),
            self.targets.next_deadline(),  # active health checks
        )
        if self.metrics is not None:  # metrics clients' deadlines
            deadline = min(deadline, self.metrics.next_deadline())
        return deadline

    def _run_deadlines(self) -> None:
        now = time.monotonic()
        if self.metrics is not None:  # drop metrics clients past their deadline
            self.metrics.run_deadlines(now)
        if now >= self.shutdown_deadline:
            self.pool.kill_all("graceful timeout passed")
            self.shutdown_deadline = math.inf
        self.pool.run_deadlines(now)
        self.reloader.run_deadlines(now)
        self.targets.run_deadlines(now)
        if now >= self.readiness.idle_deadline():
            self.begin_shutdown(
                EXIT_OK, f"no connections for {format_timespan(self.config.exit_idle_time)}"
            )
        self.readiness.run_deadlines(now)

    # -- reloads (reload.ReloadHost) -----------------------------------------------------

    def reload_ready(self) -> bool:
        return self.readiness.ready_notified and self.pool.generation_serving

    def reload_stopping(self) -> bool:
        return self.pool.stopping

    def before_exec(self) -> bool:
        assert self.wakeup is not None
        self.wakeup.dispatch()  # signals received but not handled yet would die with this image
        return not self.pool.stopping

    def reexec_state(self, started: float, pending: bool) -> ReexecState:
        return snapshot(self, started, pending)

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
            self.on_serving()

    def on_sigttou(self) -> None:
        if self.pool.remove_worker():  # the last one not yet serving may have gone
            self.on_serving()

    def _on_fatal(self, reason: str) -> None:
        if self.takeover is not None and self.takeover.fall_back(self, reason):
            return
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
        self.reloader.cancel()
        self.resources.close_own_listeners()


def _serve_metrics(master: Master) -> "MetricsEndpoint | None":
    """The metrics endpoint on `master`'s metrics sockets. prometheus_client is loaded
    only when there is one: every worker forked later starts with a copy."""
    from forkproxy.supervisor.metrics.endpoint import open_metrics

    resources = master.resources
    assert resources.scoreboard is not None and resources.admission is not None
    assert master.selector is not None
    return open_metrics(
        resources.metrics_listeners,
        master.selector,
        master.pool,
        resources.scoreboard,
        resources.admission,
        master.reloader,
        master.targets,
        # Held /healthz, at start-up only: after a reload, the old workers serve.
        start_timeout=0.0 if master.takeover else master.config.worker_timeout,
    )
