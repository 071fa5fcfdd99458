"""The image a reload re-executed: take over what the previous one held, apply the new
settings or go on with the previous ones, and never leave the service without workers.

`cli` calls `take_over` first when $FORKPROXY_REEXEC_STATE is set (reexec_state.py). The
previous image's listeners, metrics sockets, shared mapping and event pipe are adopted
on their descriptors (nothing closed or re-bound); its workers become this master's old
generation. The new settings are the command line and the --config file as they are now
(the check read the same, unless the file changed since): checked with the listeners at
hand, then applied (--listen added, dropped). A new generation starts with them; once it
serves, the pool tells the old one to drain, READY=1 follows, the reload counts as ok.
If the new settings cannot be applied, the master goes on with the previous image's
(its argv and --config text, from the state) and its workers, and counts the reload as
failed; so it does if the new generation cannot start (`fall_back`) while the old one
still serves. Two cases end the master: a shared memory layout that changed between the
check and the exec (another upgrade in between), and previous settings this code refuses
while the new ones fail too; both need the installed code to change during the reload.
`snapshot` is the other side: what a master hands the image it execs into.
"""

import logging
import os
import sys
from typing import TYPE_CHECKING

from forkproxy import __version__, logs
from forkproxy.errors import ForkproxyError, UsageErrors
from forkproxy.relay.engine import log_python_fallback
from forkproxy.settings.arguments import load_settings
from forkproxy.settings.config import Config
from forkproxy.shared.layout import SOURCE_ENTRIES, source_entries
from forkproxy.supervisor.check import check_settings_for
from forkproxy.supervisor.limits import raise_fd_limit
from forkproxy.supervisor.pool import WorkerPool
from forkproxy.supervisor.reexec_state import (
    STATE_VARIABLE,
    ReexecState,
    StateError,
    WorkerRecord,
    take_state,
)
from forkproxy.supervisor.reload import Reloader
from forkproxy.supervisor.resources import Resources, source_limit
from forkproxy.supervisor.worker_record import WorkerProcess

if TYPE_CHECKING:
    from forkproxy.supervisor.master import Master

log = logging.getLogger("forkproxy")

EXIT_FAILURE = 1


def take_over(argv: list[str]) -> int | None:
    """Run as the new image of a reload; None if $FORKPROXY_REEXEC_STATE names no state
    of this process (then forkproxy starts as usual)."""
    from forkproxy.supervisor.master import Master

    try:
        state = take_state()
    except StateError as error:
        print(f"forkproxy: ignoring ${STATE_VARIABLE}: {error}", file=sys.stderr)
        return None
    if state is None:
        return None
    logs.setup(state.log_level)
    takeover = Takeover(state)
    try:
        config, config_text = takeover.settings(argv)
    except ForkproxyError as error:
        log.error("cannot go on after the reload: %s", error)
        return EXIT_FAILURE
    logs.setup(config.log_level)
    log_python_fallback(config)
    master = Master(config, [], argv, config_text, takeover=takeover)
    try:
        return master.run()
    finally:
        master.close()


class Takeover:
    """The previous image's state, and whether its successor's settings were applied."""

    def __init__(self, state: ReexecState) -> None:
        self.state = state
        self.resources = Resources()
        self.applied = False  # the new settings run; False: the previous image's

    def settings(self, argv: list[str]) -> tuple[Config, str | None]:
        """Adopt what the previous image held; the new settings applied to it if they
        can be, else the previous ones. ForkproxyError if neither can run."""
        self.resources.adopt(self.state)
        try:
            config, config_text = load_settings(argv)
            planned = self.resources.planned(config)
            check_settings_for(config, planned, raise_fd_limit())
            self.resources.apply(config)
        except ForkproxyError as error:
            _log_failure(error)
        except Exception:  # a bug of the new code: the old workers go on serving
            log.exception("reload failed: the new settings cannot be applied")
        else:
            self.applied = True
            _note_source_table(config, self.resources)
            return config, config_text
        log.warning("keeping the previous settings and workers")
        return self.previous()

    def previous(self) -> tuple[Config, str | None]:
        """The settings the previous image ran with. ForkproxyError if refused."""
        return load_settings(list(self.state.argv), self.state.config_text)

    def hand_over(self, pool: WorkerPool, reloader: Reloader) -> None:
        """The previous image's workers and counters, to this image's pool and reloader."""
        state = self.state
        workers = [_worker(record) for record in state.workers]
        generation = state.generation + 1 if self.applied else state.generation
        pool.adopt(workers, generation, not self.applied and state.generation_serving)
        if not self.applied:
            pool.target_workers = state.target_workers
            pool.ranks.restore(state.ranks_size, dict(state.ranks))
        pool.restarts = state.restarts
        reloader.ok, reloader.failed = state.reloads_ok, state.reloads_failed
        reloader.last_success = state.last_reload_success
        reloader.pending = state.reload_pending
        reloader.started = state.reload_started
        log.info(
            "reload: took over %d workers from forkproxy %s%s",
            len(workers),
            state.version,
            ", starting new workers" if self.applied else "",
        )
        if self.applied:
            reloader.taking_over = True
        else:
            reloader.count_failed()

    def fall_back(self, master: "Master", reason: str) -> bool:
        """The new generation cannot start (`reason`) while the old one serves: go back
        to the previous settings and the old workers. False if that cannot be done."""
        pool = master.pool
        if not self.applied or not pool.can_fall_back():
            return False
        try:
            config, config_text = self.previous()
        except ForkproxyError as error:
            log.error("the previous settings cannot be used either: %s", error)
            return False
        log.error("reload failed: %s; the old workers go on with the previous settings", reason)
        self.applied = False
        resources = master.resources
        assert resources.admission is not None
        resources.revert()
        master.config, master.config_text = config, config_text
        master.readiness.config = config
        resources.admission.set_limits(config.connections_max, source_limit(config))
        master.targets.reset(config, resources.listeners)  # the old workers' pairs
        master.reloader.taking_over = False
        master.reloader.count_failed()
        spec = master.worker_spec(config)
        state = self.state
        ranks = (state.ranks_size, dict(state.ranks))
        pool.fall_back(spec, state.generation, state.target_workers, ranks)
        master.on_serving()
        return True


def snapshot(master: "Master", started: float, pending: bool) -> ReexecState:
    """What `master` hands the image it re-executes into."""
    resources, pool, reloader = master.resources, master.pool, master.reloader
    assert resources.mapping is not None and resources.events is not None
    assert resources.scoreboard is not None
    listeners, metrics_listeners = resources.records()
    return ReexecState(
        pid=os.getpid(),
        version=__version__,
        argv=tuple(master.argv),
        config_text=master.config_text,
        log_level=master.config.log_level,
        listeners=listeners,
        metrics_listeners=metrics_listeners,
        mapping_fd=resources.mapping.fd,
        events=resources.events,
        workers=tuple(_record(worker) for worker in pool.workers.values()),
        generation=pool.generation,
        generation_serving=pool.generation_serving,
        target_workers=pool.target_workers,
        ranks_size=pool.ranks.size,
        ranks=tuple(sorted(pool.ranks.assigned().items())),
        listener_rows=resources.scoreboard.listener_rows,
        restarts=pool.restarts,
        reloads_ok=reloader.ok,
        reloads_failed=reloader.failed,
        last_reload_success=reloader.last_success,
        reload_pending=pending,
        reload_started=started,
    )


def _record(worker: WorkerProcess) -> WorkerRecord:
    return WorkerRecord(
        pid=worker.pid,
        slot=worker.slot,
        generation=worker.generation,
        started=worker.started,
        ready=worker.ready,
        stopping=worker.stopping,
        killed=worker.killed,
        hung=worker.hung,
        kill_deadline=worker.kill_deadline,
    )


def _worker(record: WorkerRecord) -> WorkerProcess:
    worker = WorkerProcess(record.slot, record.pid, record.generation)
    worker.started = record.started
    worker.ready = record.ready
    worker.stopping = record.stopping
    worker.killed = record.killed
    worker.hung = record.hung
    worker.kill_deadline = float("inf") if record.kill_deadline is None else record.kill_deadline
    return worker


def _log_failure(error: ForkproxyError) -> None:
    lines = error.messages if isinstance(error, UsageErrors) else [str(error)]
    for line in lines:
        log.error("reload failed: %s", line)


def _note_source_table(config: Config, resources: Resources) -> None:
    """The per-source table keeps the size the first start gave it."""
    assert resources.mapping is not None
    rows = resources.mapping.header(SOURCE_ENTRIES)
    if source_limit(config) and source_entries(config.connections_max) > rows:
        log.warning(
            "the per-source table keeps its %d rows, sized at start: up to %d sources at "
            "once; a restart sizes it for --connections-max=%d",
            rows,
            rows // 2,
            config.connections_max,
        )
