"""A worker's coarse sweeps for --connect-timeout and --idle-timeout.

No timer per connection and nothing re-armed per event: one loop timer per kind of
deadline, armed only while there is something to watch, looks at every watched
connection each `sweep_interval(timeout)` and closes those past their deadline. A
deadline is therefore met late by at most one interval (idle: two, see `sweep_idle`),
which is an eighth of the timeout. Never logs and never touches a socket itself.

An exception from one watched connection goes to the sweep's `on_error(item, exception)`
and the sweep goes on with the others; a sweep whose callback raised anyway is armed
again all the same, so one fault cannot end the timeouts of every connection.
"""

import errno
import os
import time
from collections.abc import Callable, Collection, Iterable
from typing import Protocol, TypeVar

from forkproxy.relay.splice import Relay

SWEEP_DIVISOR = 8  # sweeps per timeout: how late a deadline may be met, as a fraction
SWEEP_INTERVAL_MIN = 0.01
SWEEP_INTERVAL_MAX = 60.0

# What a relay closed by a timeout records: ETIMEDOUT, logged at debug level only (the
# worker logs one line for the whole graceful timeout).
IDLE_ERROR = OSError(errno.ETIMEDOUT, f"{os.strerror(errno.ETIMEDOUT)} (--idle-timeout)")
GRACEFUL_ERROR = OSError(errno.ETIMEDOUT, f"{os.strerror(errno.ETIMEDOUT)} (--graceful-timeout)")


class Loop(Protocol):
    """The part of an asyncio loop a sweep uses."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> object: ...


class Expiring(Protocol):
    """A connection attempt with a deadline (`TargetConnect`, `FailoverConnect`)."""

    def expire(self, now: float) -> bool: ...


E = TypeVar("E", bound=Expiring)


def sweep_interval(timeout: float) -> float:
    return min(SWEEP_INTERVAL_MAX, max(SWEEP_INTERVAL_MIN, timeout / SWEEP_DIVISOR))


class LazySweep:
    """Runs `sweep(now)` every `interval` seconds while `watched` is not empty.

    The owner calls `arm()` after adding to `watched`; arming an armed sweep is one
    attribute test.
    """

    __slots__ = ("loop", "interval", "watched", "sweep", "armed", "_run_bound")

    def __init__(
        self,
        loop: Loop,
        interval: float,
        watched: Collection[object],
        sweep: Callable[[float], None],
    ) -> None:
        self.loop = loop
        self.interval = interval
        self.watched = watched
        self.sweep = sweep
        self.armed = False
        self._run_bound = self._run

    def arm(self) -> None:
        if not self.armed:
            self.armed = True
            self.loop.call_later(self.interval, self._run_bound)

    def _run(self) -> None:
        self.armed = False
        try:
            self.sweep(time.monotonic())
        finally:
            if self.watched:
                self.arm()


def sweep_connects(
    attempts: Iterable[E], now: float, on_error: Callable[[E, Exception], None]
) -> None:
    """Let every attempt past its deadline time out (each moves on or fails by itself)."""
    for attempt in list(attempts):
        try:
            attempt.expire(now)
        except Exception as error:
            on_error(attempt, error)


def sweep_idle(
    relays: Iterable[Relay],
    now: float,
    timeout: float,
    on_error: Callable[[Relay, Exception], None],
) -> None:
    """Abort relays that moved no byte for `timeout` (an abort: see splice.py).

    A relay read since the last sweep is only marked: its quiet time starts now. So a
    relay is closed between `timeout` and `timeout` plus two intervals after its last
    byte, and one that moves a byte at least every `timeout` minus two intervals never is.
    """
    for relay in list(relays):
        if relay.active:
            relay.active = False
            relay.quiet_since = now
        elif now - relay.quiet_since >= timeout and not relay.closed:
            try:
                relay.fail(IDLE_ERROR)
            except Exception as error:
                on_error(relay, error)
