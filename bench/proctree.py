"""What /proc says about a process and all its descendants: count, RSS, PSS, CPU time.

Reads only; never signals or waits for a process.

CPU time is utime + stime of each live process (all its threads) plus cutime + cstime, the
time of the children it has reaped (proc(5)). So a tree sampled before and after a load is
charged for a worker that exited in between, as long as its parent in the tree reaped it
with wait(2): the kernel adds a child's time to its parent only then (not when SIGCHLD is
ignored, and not when a process outside the tree reaps it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class TreeUsage:
    """Summed over a process and all its descendants at one instant."""

    processes: int
    rss_kib: int
    pss_kib: int
    cpu_seconds: float


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """User and system CPU seconds of a tree at one instant, reaped children included."""

    user_seconds: float
    system_seconds: float

    @property
    def seconds(self) -> float:
        return self.user_seconds + self.system_seconds

    def __sub__(self, earlier: CpuTimes) -> CpuTimes:
        return CpuTimes(
            self.user_seconds - earlier.user_seconds, self.system_seconds - earlier.system_seconds
        )


def tree_pids(root: int) -> list[int]:
    """`root` and every live descendant, found through the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _read(f"/proc/{entry.name}/stat")
        if stat is None:
            continue
        # comm may hold spaces and parentheses; the fields after the last ')' do not.
        fields = stat.rsplit(")", 1)[-1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    pending = [root]
    while pending:
        pid = pending.pop()
        if pid in found or not os.path.exists(f"/proc/{pid}"):
            continue
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def tree_usage(root: int) -> TreeUsage:
    """RSS and PSS (KiB) and CPU time (user+system, reaped children included) of a tree."""
    rss = pss = 0
    cpu_ticks = 0
    pids = tree_pids(root)
    for pid in pids:
        status = _read(f"/proc/{pid}/status") or ""
        rss += _kib_field(status, "VmRSS:")
        pss += _kib_field(_read(f"/proc/{pid}/smaps_rollup") or "", "Pss:")
        user, system = _cpu_ticks(pid)
        cpu_ticks += user + system
    return TreeUsage(len(pids), rss, pss, cpu_ticks / _CLOCK_TICKS)


def tree_cpu(root: int) -> CpuTimes:
    """User and system CPU time of `root`'s tree: only /proc/PID/stat, cheap enough to
    take right before and after a load.

    A child reaped between the listing and the reads can be missed or counted twice (its
    time moves into the parent's cutime); no relay here loses a worker during a load.
    """
    user = system = 0
    for pid in tree_pids(root):
        pid_user, pid_system = _cpu_ticks(pid)
        user += pid_user
        system += pid_system
    return CpuTimes(user / _CLOCK_TICKS, system / _CLOCK_TICKS)


def _cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime + cutime, stime + cstime) in clock ticks; (0, 0) once the process is gone."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return 0, 0
    # comm may hold spaces and parentheses; the fields after the last ')' do not.
    # utime, stime, cutime, cstime: fields 14-17 of proc(5), 12-15 after comm.
    utime, stime, cutime, cstime = (int(value) for value in stat.rsplit(")", 1)[-1].split()[11:15])
    return utime + cutime, stime + cstime


def _kib_field(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None
