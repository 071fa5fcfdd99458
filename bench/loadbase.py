"""What every load is: its figures, the CPU cost it charges per unit of work, and its client.

A load names its backend, its probe and its metrics, and runs one bounded measurement
against a port where a contender relays to that backend. Never launches a contender, never
reads /proc for CPU (the runner does, around `run`).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.probes import Probe
from bench.procs import ProcessGroup, Registry
from bench.settings import Settings
from bench.tools import Tools

GIB = 1 << 30


class LoadError(RuntimeError):
    """A measurement produced no usable figure; the message says why."""


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 0
    # Measured on the proxy itself (its CPU, its system calls): no figure for `direct`.
    proxies_only: bool = False
    # CPU time per unit of work: the table also shows its user and system parts.
    cpu_cost: bool = False


def cpu_metric(key: str, label: str, unit: str, digits: int) -> Metric:
    """The figure of a `Cost`: lower is better, proxies only, shown with its user/system parts."""
    return Metric(key, label, unit, False, digits, proxies_only=True, cpu_cost=True)


@dataclass(frozen=True, slots=True)
class Cost:
    """CPU per unit of work: the proxy tree's user + system seconds over the load, times
    `cpu_scale`, divided by the work done in units of `work_per_unit` `work_unit`."""

    metric: Metric
    work_unit: str
    cpu_scale: float = 1.0
    work_per_unit: float = 1.0

    def per_unit(self, cpu_seconds: float, work: float) -> float:
        return cpu_seconds * self.cpu_scale / (work / self.work_per_unit)


@dataclass(frozen=True, slots=True)
class Target:
    """Where the load sends its clients, and what it may need to look at or start."""

    port: int
    group: ProcessGroup | None
    registry: Registry
    workdir: Path
    tools: Tools
    settings: Settings


Values = dict[str, float]
Extra = dict[str, object]


class Load:
    name = ""
    backend = ""
    metrics: tuple[Metric, ...] = ()
    needs: tuple[str, ...] = ()
    proxies_only = False
    # The proxy's CPU over `run` is charged per unit of work (`work()`) when set.
    cost: Cost | None = None
    # False for a load whose CPU means nothing (run under strace): no CPU share recorded.
    cpu_accounted = True

    def probe(self, tools: Tools, settings: Settings) -> Probe:
        raise NotImplementedError

    def seconds(self, settings: Settings) -> float:
        """A rough duration, for the time estimate printed before a run."""
        return settings.duration + 1.0

    def holds(self, settings: Settings) -> int:
        """Connections the echo backend must be able to hold."""
        return 0

    def run(self, target: Target) -> tuple[Values, Extra]:
        raise NotImplementedError

    def work(self, values: Values, extra: Extra) -> float | None:
        """Units of `cost.work_unit` that crossed the proxy during `run`, if it counts them."""
        return None


def run_client(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """A load client in its own session, so a timeout kill takes its children too."""
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as error:
        raise LoadError(f"{Path(argv[0]).name} did not finish in {timeout:.0f} s") from error
