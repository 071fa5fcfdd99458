"""FORKPROXY_FAILPOINT: faults injected on purpose, for tests only.

Not an option and not for production: the variable lets a test make forkproxy's own code
fail where no outside event can, and check that the failure stays in what it hits. Unset,
it costs one attribute test per connection at two places, nothing per event.

  worker-crash  every worker raises at start, as a bug would (exit status 70)
  accept:N      the N-th client a worker admits raises before the connector has it
  connected:N   the N-th connection of a worker raises in its connect callback, once its
                relay exists but before the relay starts
  readable:N    the N-th relay of a worker raises in its first readable callback, from
                the poller's dispatch

N counts from 1 in each worker, and in the one process of Accept=yes or --inetd (which
knows `connected:1` and `readable:1`). The exception raised is `InjectedFault`. A value
not in this list injects nothing.
"""

import os

from forkproxy.relay.splice import Direction

FAILPOINT = "FORKPROXY_FAILPOINT"
WORKER_CRASH = "worker-crash"
_STAGES = frozenset({"accept", "connected", "readable"})


class InjectedFault(RuntimeError):
    """The exception a failpoint raises."""


class Failpoint:
    """Where to fail (`stage`), and at which of its passes (`nth`)."""

    __slots__ = ("stage", "nth", "passes")

    def __init__(self, stage: str, nth: int) -> None:
        self.stage = stage
        self.nth = nth
        self.passes = 0

    def due(self, stage: str) -> bool:
        """Count a pass at `stage`; true on the one that should fail."""
        if stage != self.stage:
            return False
        self.passes += 1
        return self.passes == self.nth

    def fault(self) -> InjectedFault:
        return InjectedFault(f"{FAILPOINT}={self.stage}:{self.nth}")


def failpoint_from_environment() -> Failpoint | None:
    text = os.environ.get(FAILPOINT, "")
    if text == WORKER_CRASH:
        return Failpoint(WORKER_CRASH, 1)
    stage, _, nth = text.partition(":")
    if stage in _STAGES and nth.isascii() and nth.isdigit() and 0 < len(nth) < 10:
        return Failpoint(stage, int(nth))
    return None


class FailingDirection(Direction):
    """readable:N: a direction whose first readable event raises."""

    __slots__ = ()

    def _on_readable(self) -> None:
        raise InjectedFault(f"{FAILPOINT}=readable")
