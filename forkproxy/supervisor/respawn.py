"""When a dead worker's replacement starts, and when the master stops replacing workers.

A worker that dies before it has served for STABLE_AFTER seconds died "early": its
replacement waits, the delay doubling to BACKOFF_MAX. CRASH_LIMIT early deaths of the
workers' own doing (`died_on_its_own`) within CRASH_WINDOW seconds mean the code or the
host cannot run a worker: the master then gives up, so systemd's Restart= takes over
instead of a fork storm. Decides only; never forks, kills or logs.
"""

import collections
import os
import signal

STABLE_AFTER = 5.0
CRASH_LIMIT = 5
CRASH_WINDOW = 10.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0

# Signals a process gets from its own fault (or its own abort()). Any other signal that
# ends a worker was sent to it from outside.
CRASH_SIGNALS = frozenset(
    {
        signal.SIGSEGV,
        signal.SIGBUS,
        signal.SIGILL,
        signal.SIGFPE,
        signal.SIGABRT,
        signal.SIGSYS,
        signal.SIGTRAP,
    }
)


class RespawnPolicy:
    """Backoff per slot, and the crash-loop guard."""

    def __init__(self) -> None:
        self.backoff: dict[int, float] = {}  # slot -> delay before its next replacement
        self.early_deaths: collections.deque[float] = collections.deque()

    def delay(self, slot: int, early: bool) -> float:
        """Seconds before `slot`'s replacement starts: doubling to BACKOFF_MAX while its
        workers die early, none after a worker that had served a stable spell."""
        if early:
            delay = min(BACKOFF_MAX, self.backoff.get(slot, BACKOFF_FIRST / 2) * 2)
            self.backoff[slot] = delay
            return delay
        self.backoff.pop(slot, None)
        return 0.0

    def crash_loop(self, now: float) -> bool:
        """Count an early crash at `now`; True once CRASH_LIMIT fall within CRASH_WINDOW."""
        self.early_deaths.append(now)
        while self.early_deaths and self.early_deaths[0] < now - CRASH_WINDOW:
            self.early_deaths.popleft()
        return len(self.early_deaths) >= CRASH_LIMIT


def died_on_its_own(status: int, hung: bool) -> bool:
    """Whether a worker's unexpected end (wait status `status`) was its own doing.

    Only those count towards the crash loop: a non-zero exit status (a bug escaped, a
    failed set-up), a crash signal (CRASH_SIGNALS), or our SIGKILL because its heartbeat
    stopped (`hung`). A signal sent from outside (SIGKILL from the kernel's OOM killer or
    an admin) says nothing about the code, and a replacement may well run: giving up
    would turn memory pressure into an outage. Such deaths still delay the replacement
    (the backoff), so they cannot become a fork storm either. Exit status 0 is a worker
    that drained after a SIGTERM sent to it alone.
    """
    if os.WIFSIGNALED(status):
        return hung or os.WTERMSIG(status) in CRASH_SIGNALS
    return os.waitstatus_to_exitcode(status) != 0


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"was killed by signal {signum} ({name})"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
