"""Forking a worker leaves the master's signal mask as it was."""

import os
import signal
from collections.abc import Iterator

import pytest

from forkproxy.settings.arguments import parse_args
from forkproxy.shared.protocol import WorkerSpec
from forkproxy.supervisor.signals import MASTER_SIGNALS
from forkproxy.supervisor.workers import WorkerProcesses
from tests.support.shared_memory import Shared, make_shared


@pytest.fixture
def processes() -> Iterator[WorkerProcesses]:
    shared: Shared = make_shared(4, slots=0)
    spec = WorkerSpec(
        config=parse_args(["127.0.0.1:1"]),
        slot=0,
        generation=0,
        listeners=(),
        scoreboard=shared.scoreboard,
        admission=shared.admission,
        events_fd=-1,
        master_pid=os.getpid(),
        heartbeat_interval=1.0,
    )
    # The child leaves at once, before it would run a worker.
    yield WorkerProcesses(spec, MASTER_SIGNALS, lambda: os._exit(0), lambda reason: None)
    shared.close()


@pytest.mark.parametrize("blocked", [False, True])
def test_spawn_gives_back_the_mask_it_found(processes: WorkerProcesses, blocked: bool) -> None:
    """A reload blocks the master's signals, then handles those already received, which
    may start a worker (SIGTTIN): the signals must still be blocked when it execs."""
    before = signal.pthread_sigmask(signal.SIG_SETMASK, MASTER_SIGNALS if blocked else ())
    try:
        processes.spawn(0)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    (pid,) = processes.workers
    assert os.waitpid(pid, 0)[0] == pid
    assert mask & set(MASTER_SIGNALS) == (set(MASTER_SIGNALS) if blocked else set())
