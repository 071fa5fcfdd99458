"""What /proc says about a process and all its descendants: count, RSS, PSS, CPU time.

Reads only; never signals or waits for a process.
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
        stat = _read(f"/proc/{pid}/stat")
        if stat is not None:
            fields = stat.rsplit(")", 1)[-1].split()
            # utime, stime, cutime, cstime: fields 14-17 of proc(5), 12-15 after comm.
            cpu_ticks += sum(int(value) for value in fields[11:15])
    return TreeUsage(len(pids), rss, pss, cpu_ticks / _CLOCK_TICKS)


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
