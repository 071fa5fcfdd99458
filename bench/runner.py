"""Runs the plan: rounds, in each every load, in each every contender in rotating order.

One measurement starts a fresh backend and a fresh contender on new ports, waits until bytes
cross the proxy, runs the load, and stops both by process group; its samples, with the
machine facts, make the results document. Never formats a table, never exits.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.backends import BackendError, describe_backends, start_backend, stop_backend
from bench.contenders import Contender, all_contenders
from bench.holding import HolderError
from bench.loadbase import Load, LoadError, Target
from bench.loads import all_loads
from bench.probes import wait_relaying
from bench.procs import ProcessGroup, Registry
from bench.proctree import CpuTimes, tree_cpu
from bench.settings import Settings
from bench.tools import Tools, cpu_ticks, loadavg, machine, versions


@dataclass(slots=True)
class Sample:
    round: int
    load: str
    contender: str
    ok: bool
    error: str = ""
    values: dict[str, float] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)
    started: str = ""
    wall_seconds: float = 0.0
    # User + system time of the proxy's whole process tree over the load (see proctree).
    proxy_cpu_seconds: float | None = None
    proxy_cpu_user_seconds: float | None = None
    proxy_cpu_system_seconds: float | None = None
    proxy_cpu_percent: float | None = None
    # What crossed the proxy meanwhile, in the load's unit of work (bytes, requests,
    # connections); values[<cost key>] is the CPU per unit, cpu_split its user and system parts.
    work: float | None = None
    work_unit: str = ""
    cpu_split: dict[str, float] = field(default_factory=dict)
    loadavg_before: list[float] = field(default_factory=list)
    loadavg_after: list[float] = field(default_factory=list)
    # Share of both cores busy during the load from /proc/stat, everything on the machine
    # included, to spot other work. Tick-sampled: it under-counts light, bursty loads
    # (seen here below the proxy's own CPU time at 1000 req/s), so it stays out of tables.
    machine_busy_percent: float | None = None


@dataclass(slots=True)
class Plan:
    contenders: list[Contender]
    loads: list[Load]
    notes: list[str]
    skipped_contenders: dict[str, str]
    skipped_loads: dict[str, str]

    def measurements(self) -> list[tuple[Load, Contender]]:
        return [
            (load, contender)
            for load in self.loads
            for contender in self.contenders
            if not (load.proxies_only and contender.name == "direct")
        ]

    def estimate_seconds(self, settings: Settings) -> float:
        per_round = sum(load.seconds(settings) + 1.5 for load, _ in self.measurements())
        return per_round * settings.rounds


def make_plan(settings: Settings, tools: Tools) -> Plan:
    """Pick the contenders and loads asked for that can run here; note why others cannot."""
    notes: list[str] = []
    skipped_contenders: dict[str, str] = {}
    contenders = []
    for contender in all_contenders():
        if settings.contenders and contender.name not in settings.contenders:
            continue
        reason = contender.unavailable(tools)
        if reason is None:
            contenders.append(contender)
        else:
            skipped_contenders[contender.name] = reason
            notes.append(f"skipping {contender.name}: {reason}")
    skipped_loads: dict[str, str] = {}
    loads = []
    for load in all_loads():
        if load.name not in settings.loads:
            continue
        missing = [name for name in load.needs if getattr(tools, name) is None]
        if missing:
            reason = "; ".join(tools.missing_note(name) for name in missing)
            skipped_loads[load.name] = reason
            notes.append(f"skipping load {load.name}: {reason}")
        else:
            loads.append(load)
    return Plan(contenders, loads, notes, skipped_contenders, skipped_loads)


def run_plan(
    plan: Plan,
    settings: Settings,
    tools: Tools,
    registry: Registry,
    workroot: Path,
    on_sample: Callable[[Sample, int, int], None],
) -> list[Sample]:
    """Every measurement of every round, contenders rotated so none always goes first."""
    samples: list[Sample] = []
    total = len(plan.measurements()) * settings.rounds
    for round_index in range(settings.rounds):
        for load in plan.loads:
            eligible = [c for load_, c in plan.measurements() if load_ is load]
            shift = round_index % max(1, len(eligible))
            for contender in eligible[shift:] + eligible[:shift]:
                workdir = workroot / f"r{round_index + 1}-{load.name}-{contender.name}"
                sample = measure(
                    round_index + 1, load, contender, settings, tools, registry, workdir
                )
                samples.append(sample)
                on_sample(sample, len(samples), total)
    return samples


def measure(
    round_number: int,
    load: Load,
    contender: Contender,
    settings: Settings,
    tools: Tools,
    registry: Registry,
    workdir: Path,
) -> Sample:
    sample = Sample(
        round_number,
        load.name,
        contender.name,
        ok=False,
        started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    proxy_dir = workdir / "proxy"
    # nginx workers drop to nobody when started as root and must reach their files.
    proxy_dir.mkdir(mode=0o755, parents=True)
    workdir.chmod(0o755)
    try:
        backend = start_backend(
            load.backend, registry, workdir / "backend", tools, settings, load.holds(settings)
        )
    except (BackendError, OSError) as error:
        sample.error = f"backend: {error}"
        return sample
    try:
        try:
            running = contender.launch(backend.target, proxy_dir, registry, tools, settings)
        except OSError as error:
            sample.error = f"cannot launch {contender.name}: {error}"
            return sample
        try:
            probe = load.probe(tools, settings)
            alive = running.group.alive if running.group else None
            failure = wait_relaying(probe, running.port, settings.ready_timeout, alive)
            if failure is not None:
                sample.error = f"did not relay within {settings.ready_timeout:g} s: {failure}"
                if running.group is not None:
                    sample.error += f"; {contender.name} log: {running.group.log_tail()}"
                for group in backend.groups:
                    if not group.alive():
                        sample.error += f"; backend exited: {group.log_tail()}"
                return sample
            _measure_running(
                sample, load, running.port, running.group, registry, workdir, tools, settings
            )
        finally:
            if running.group is not None:
                registry.stop(running.group)
    finally:
        stop_backend(registry, backend)
    return sample


def _measure_running(
    sample: Sample,
    load: Load,
    port: int,
    group: ProcessGroup | None,
    registry: Registry,
    workdir: Path,
    tools: Tools,
    settings: Settings,
) -> None:
    target = Target(port, group, registry, workdir, tools, settings)
    accounted = group if load.cpu_accounted else None
    sample.loadavg_before = loadavg()
    cpu_before = tree_cpu(accounted.pid) if accounted else None
    busy_before, total_before = cpu_ticks()
    started = time.monotonic()
    try:
        sample.values, sample.extra = load.run(target)
        sample.ok = True
    except (LoadError, HolderError, BackendError) as error:
        sample.error = str(error)
    sample.wall_seconds = round(time.monotonic() - started, 3)
    busy_after, total_after = cpu_ticks()
    if total_after > total_before:
        busy_share = (busy_after - busy_before) / (total_after - total_before)
        sample.machine_busy_percent = round(100 * busy_share, 1)
    sample.loadavg_after = loadavg()
    if accounted is not None and cpu_before is not None:
        _charge_cpu(sample, load, tree_cpu(accounted.pid) - cpu_before)
    if group is not None and not group.alive():
        sample.ok = False
        sample.error = (sample.error + "; " if sample.error else "") + (
            f"{sample.contender} exited during the load: {group.log_tail()}"
        )


def _charge_cpu(sample: Sample, load: Load, cpu: CpuTimes) -> None:
    """The tree's CPU over the load, and per unit of the work the load did."""
    sample.proxy_cpu_seconds = round(cpu.seconds, 3)
    sample.proxy_cpu_user_seconds = round(cpu.user_seconds, 3)
    sample.proxy_cpu_system_seconds = round(cpu.system_seconds, 3)
    sample.proxy_cpu_percent = round(100 * cpu.seconds / max(sample.wall_seconds, 1e-9), 1)
    if load.cost is None or not sample.ok:
        return
    work = load.work(sample.values, sample.extra)
    if not work:
        return
    sample.work = work
    sample.work_unit = load.cost.work_unit
    sample.values[load.cost.metric.key] = load.cost.per_unit(cpu.seconds, work)
    sample.cpu_split = {
        "user": load.cost.per_unit(cpu.user_seconds, work),
        "system": load.cost.per_unit(cpu.system_seconds, work),
    }


def document(
    plan: Plan,
    settings: Settings,
    tools: Tools,
    samples: list[Sample],
    started: datetime.datetime,
    load_at_start: list[float],
    complete: bool,
) -> dict[str, object]:
    """The results JSON: machine, versions, settings, configurations and every raw sample."""
    return {
        # 2: CPU per unit of work (values, cpu_split, work), the syscalls load.
        "schema": 2,
        "tool": "bench.compare",
        "command": sys.argv,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "complete": complete,
        "machine": machine(),
        "versions": versions(tools),
        "loadavg_start": load_at_start,
        "loadavg_end": loadavg(),
        "settings": dataclasses.asdict(settings),
        "contenders": {
            **{
                contender.name: {"available": True, "config": contender.describe(tools, settings)}
                for contender in plan.contenders
            },
            **{
                name: {"available": False, "note": note}
                for name, note in plan.skipped_contenders.items()
            },
        },
        "loads": {
            load.name: {
                "backend": load.backend,
                "description": (load.__doc__ or "").strip(),
                "metrics": [dataclasses.asdict(metric) for metric in load.metrics],
            }
            for load in plan.loads
        },
        "backends": describe_backends(settings),
        "skipped_loads": plan.skipped_loads,
        "notes": plan.notes,
        "samples": [dataclasses.asdict(sample) for sample in samples],
    }
