"""The frozen `Config` a master and its workers run with, and the checks across fields.

Built by `cli` from argv; never parses argv and never does I/O.
"""

import math
import os
from dataclasses import dataclass

from forkproxy.address import ListenAddress, UpstreamAddress
from forkproxy.errors import UsageError

DEFAULT_CONNECTIONS_MAX = 256  # systemd-socket-proxyd's default
DEFAULT_GRACEFUL_TIMEOUT = 30.0
DEFAULT_WORKER_TIMEOUT = 30.0
DEFAULT_SOCKET_MODE = 0o666  # SocketMode= default in systemd.socket(5)
MAX_WORKERS = 128


@dataclass(frozen=True, slots=True)
class Config:
    targets: tuple[UpstreamAddress, ...]
    connections_max: int = DEFAULT_CONNECTIONS_MAX
    exit_idle_time: float = math.inf
    workers: int = 1
    listen: tuple[ListenAddress, ...] = ()
    socket_mode: int = DEFAULT_SOCKET_MODE
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.targets:
            raise UsageError("missing target: give HOST:PORT or a unix socket path")
        if self.connections_max < 1:
            raise UsageError(f"--connections-max= must be at least 1, got {self.connections_max}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise UsageError(f"--workers= must be in 1-{MAX_WORKERS}, got {self.workers}")
        if self.worker_timeout <= 0:
            raise UsageError("--worker-timeout= must be longer than 0")
        names = [listen.name for listen in self.listen if listen.name]
        if len(names) != len(set(names)):
            raise UsageError("--listen= names must be unique")

    @property
    def target(self) -> UpstreamAddress:
        return self.targets[0]

    @property
    def heartbeat_interval(self) -> float:
        """How often a worker proves its loop runs: often enough for the worker timeout."""
        return min(1.0, self.worker_timeout / 4)


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))
