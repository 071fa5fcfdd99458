"""The frozen settings of one comparison run, and the smoke preset; no I/O."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

LOADS = ("bulk", "keepalive", "churn", "latency", "idle", "capacity", "syscalls")
SMOKE_LOADS = ("bulk", "keepalive", "churn", "latency", "idle", "syscalls")
SMOKE_CONTENDERS = ("direct", "forkproxy")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a measurement depends on; recorded whole in the results JSON."""

    rounds: int = 3
    duration: float = 10.0
    loads: tuple[str, ...] = LOADS
    contenders: tuple[str, ...] = ()
    smoke: bool = False
    # Same for every proxy: -c for socket-proxyd and forkproxy, maxconn for HAProxy,
    # half of worker_connections for nginx (it counts both ends).
    max_connections: int = 30000
    # RLIMIT_NOFILE (soft = hard) every proxy is launched with, through prlimit.
    nofile: int = 20000
    haproxy_threads: int = os.cpu_count() or 1
    # "auto": option splice-auto (splices when it pays); "force": splice-request/response.
    haproxy_splice: str = "auto"
    wrk_threads: int = 2
    wrk_connections: int = 32
    wrk_timeout: float = 2.0
    backend_workers: int = 1
    small_file_bytes: int = 1024
    latency_rate: float = 1000.0
    latency_connections: int = 8
    latency_warmup: float = 1.0
    idle_connections: int = 10000
    capacity_limit: int = 25000
    open_batch: int = 500
    open_batch_timeout: float = 2.0
    hold_timeout: float = 90.0
    ready_timeout: float = 10.0
    # The syscalls load: connections counted under strace, and the traffic-free trace.
    syscall_connections: int = 200
    syscall_idle_seconds: float = 1.0


def smoke(settings: Settings) -> Settings:
    """A few seconds, forkproxy against direct, unless the caller chose otherwise."""
    return replace(
        settings,
        smoke=True,
        rounds=1,
        duration=min(settings.duration, 1.0),
        idle_connections=min(settings.idle_connections, 1000),
        latency_warmup=0.2,
        syscall_connections=min(settings.syscall_connections, 20),
        syscall_idle_seconds=min(settings.syscall_idle_seconds, 0.2),
    )
