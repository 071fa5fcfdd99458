"""Active health checks: the master checks each target, and writes UP for all workers.

A `Checker` runs in the master's selector loop: every --check-interval it starts a
`probe.Probe` for each checked target (one per target and check settings, whichever
listeners share it), a connect or an HTTP GET, bounded by --check-timeout. --check-rise
checks passed in a row bring a down target up, --check-fall failed ones take an up
target down (`CheckState`; a target starts up, and a reload keeps what the table
says); the transition is written to the target's rows of the shared table (UP), which
workers read on their next pick, and logged once: a warning when down, a notice when
up, with the reason. Host names are resolved in a child process (resolver.py), the
answer kept for a while. Stream and sequential-packet targets are checked; datagram
targets are not (UP stays 1: only their passive cool-down counts). Durations go to a
histogram in the mapping's master area. Never blocks, never starts a thread, never
relays.
"""

import errno
import logging
import math
import os
import selectors
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from forkproxy import __version__, logs
from forkproxy.logs import NOTICE
from forkproxy.settings.address import TargetAddress
from forkproxy.settings.timespan import format_timespan
from forkproxy.shared.layout import (
    CHECK_DURATION,
    CHECK_DURATION_BOUNDS,
    CHECK_DURATION_WORDS,
    WORD,
)
from forkproxy.shared.mapping import SharedMapping
from forkproxy.shared.targets_table import CheckReason, TargetTable
from forkproxy.supervisor.probe import Address, Probe, check_request
from forkproxy.supervisor.resolver import RESOLVE_INTERVAL, Resolution
from forkproxy.supervisor.target_rows import TargetEntry, TargetRows, listener_text

log = logging.getLogger("forkproxy")

USER_AGENT = f"forkproxy/{__version__} health check"
RESOLVE_TIMEOUT = 30.0  # a resolver process still running after this is killed
_CHECKED_KINDS = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)


class CheckState:
    """Rise and fall: whether a target is up after each check's result."""

    __slots__ = ("rise", "fall", "up", "streak")

    def __init__(self, rise: int, fall: int, up: bool = True, streak: int = 0) -> None:
        self.rise = rise
        self.fall = fall
        self.up = up
        self.streak = streak  # n > 0: n checks passed in a row; -n: n failed

    def record(self, passed: bool) -> bool:
        """Count one check; True when it changed `up`."""
        if passed:
            self.streak = max(self.streak, 0) + 1
            if not self.up and self.streak >= self.rise:
                self.up = True
                return True
        else:
            self.streak = min(self.streak, 0) - 1
            if self.up and -self.streak >= self.fall:
                self.up = False
                return True
        return False


def describe(reason: CheckReason, detail: int, timeout: float = math.nan) -> str:
    """A failed check's reason in words: 'connection refused', 'HTTP 503', ..."""
    if reason == CheckReason.REFUSED:
        return "no such socket" if detail == errno.ENOENT else "connection refused"
    if reason == CheckReason.TIMEOUT:
        return "timed out" + ("" if math.isnan(timeout) else f" after {format_timespan(timeout)}")
    if reason == CheckReason.HTTP_STATUS:
        return f"HTTP {detail}"
    if reason == CheckReason.RESET:
        return "connection reset"
    if reason == CheckReason.NO_RESPONSE:
        return "closed without an HTTP response"
    if reason == CheckReason.BAD_RESPONSE:
        return "not an HTTP response"
    if reason == CheckReason.UNRESOLVED:
        return "cannot resolve the host name"
    if reason == CheckReason.UNREACHABLE:
        return f"unreachable ({os.strerror(detail)})" if detail else "unreachable"
    return os.strerror(detail) if detail else "failed"


def host_header(target: TargetAddress) -> str:
    """The Host header of an HTTP check: the target's host and port ([v6]:port), or
    localhost for a unix socket."""
    if not target.port:
        return "localhost"
    host = target.host.partition("%")[0]  # an IPv6 scope means nothing to the target
    return f"[{host}]:{target.port}" if ":" in host else f"{host}:{target.port}"


@dataclass(slots=True)
class _Answer:
    """A host name's addresses, as the resolver last gave them."""

    addresses: list[Address] | None = None
    resolved_at: float = -math.inf
    running: Resolution | None = None
    started: float = math.inf  # when `running` started
    waiting: list["CheckedTarget"] | None = None


class CheckedTarget:
    """One target under one set of check settings, for the rows of every listener that
    has it with those settings."""

    def __init__(self, checker: "Checker", entries: Sequence[TargetEntry]) -> None:
        first = entries[0]
        settings = first.settings
        self.checker = checker
        self.entries = tuple(entries)
        self.rows = tuple(entry.row for entry in entries)
        self.target = first.target
        self.kind = first.target.kind
        self.interval = settings.check_interval
        self.timeout = settings.effective_check_timeout
        self.http = bool(settings.check_http) and self.kind == socket.SOCK_STREAM
        self.request = check_request(
            settings.proxy_protocol,
            settings.check_http if self.http else "",
            host_header(self.target),
            USER_AGENT,
        )
        self.state = self._inherited_state(checker.table, settings.check_rise, settings.check_fall)
        self.next_due = 0.0  # the first check at once
        self.started = math.inf  # while a check runs: when it started
        self.probe: Probe | None = None
        self.resolving = False

    def _inherited_state(self, table: TargetTable, rise: int, fall: int) -> CheckState:
        """The state a reload left in the rows (a fresh row: up, no check yet)."""
        checked = [row for row in self.rows if table.check_state(row)[3]]
        if not checked:
            return CheckState(rise, fall)
        row = checked[0]
        return CheckState(rise, fall, table.is_up(row), table.check_state(row)[0])

    @property
    def deadline(self) -> float:
        return self.started + self.timeout if self.running else self.next_due

    @property
    def running(self) -> bool:
        return self.probe is not None or self.resolving

    def start(self, now: float) -> None:
        self.started = now
        self.next_due = now + self.interval
        target = self.target
        if target.needs_resolving:
            self.checker.resolve(self, now)
        else:
            assert target.sockaddr is not None
            self.probe_addresses([(target.family, target.sockaddr)])

    def probe_addresses(self, addresses: list[Address]) -> None:
        self.resolving = False
        probe = Probe(
            self.checker.selector, self.kind, addresses, self.request, self.http, self.on_done
        )
        self.probe = probe
        probe.start()

    def expire(self) -> None:
        if self.probe is not None:
            self.probe.expire()
        elif self.resolving:
            self.resolving = False
            why = "resolving the host name"
            self.checker.finished(self, CheckReason.TIMEOUT, errno.ETIMEDOUT, why)

    def on_done(self, reason: CheckReason, detail: int) -> None:
        probe, self.probe = self.probe, None
        if probe is not None and probe.crash is not None:
            self.checker.crashed(self, probe.crash)
        self.checker.finished(self, reason, detail, "")

    def close(self) -> None:
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.close()


class Checker:
    """The master's active checks of every checked target (see the module docstring)."""

    def __init__(
        self, selector: selectors.BaseSelector, rows: TargetRows, mapping: SharedMapping
    ) -> None:
        self.selector = selector
        self.table = rows.table
        self._histogram = memoryview(mapping.memory)[
            CHECK_DURATION : CHECK_DURATION + CHECK_DURATION_WORDS * WORD
        ].cast("q")
        groups: dict[tuple[object, ...], list[TargetEntry]] = {}
        for entry in rows.entries:
            settings = entry.settings
            if not settings.checks or entry.kind not in _CHECKED_KINDS:
                continue
            key = (
                entry.target,
                settings.check_interval,
                settings.check_http,
                settings.check_rise,
                settings.check_fall,
                settings.effective_check_timeout,
                settings.proxy_protocol,
            )
            groups.setdefault(key, []).append(entry)
        self.targets = [CheckedTarget(self, entries) for entries in groups.values()]
        self.answers: dict[tuple[str, int, int], _Answer] = {}
        self.internal_errors = logs.RateLimitedLog(log, logging.ERROR)
        now_ns = time.monotonic_ns()
        for checked in self.targets:  # a reload's rows agree with what is checked now
            for row in checked.rows:
                self.table.set_up(row, checked.state.up, now_ns)
        if self.targets:
            count = len(self.targets)
            log.info("health checks of %d target%s", count, "" if count == 1 else "s")

    @property
    def enabled(self) -> bool:
        return bool(self.targets)

    # -- the master's loop ----------------------------------------------------------------

    def next_deadline(self) -> float:
        return min((checked.deadline for checked in self.targets), default=math.inf)

    def run_deadlines(self, now: float) -> None:
        for checked in self.targets:
            try:
                if checked.running:
                    if now >= checked.started + checked.timeout:
                        checked.expire()
                elif now >= checked.next_due:
                    checked.start(now)
            except Exception as error:  # a bug must not stop the master supervising
                checked.close()
                checked.resolving = False
                checked.next_due = now + checked.interval
                self.crashed(checked, error)

    def crashed(self, checked: "CheckedTarget", error: Exception) -> None:
        """An exception escaped from a check (a bug): logged at most once per interval;
        the check counts as failed, or is tried at the next interval."""
        self.internal_errors.log(
            "internal error checking target '%s', going on: %r", checked.target.text, error
        )

    def close(self) -> None:
        """Drop every check under way and the view of the mapping (at exit, and in a new
        worker: its copies)."""
        for checked in self.targets:
            checked.close()
        for answer in self.answers.values():
            if answer.running is not None:
                answer.running.close()
                answer.running = None
        try:
            self._histogram.release()
        except BufferError:
            pass

    # -- resolving host names --------------------------------------------------------------

    def resolve(self, checked: CheckedTarget, now: float) -> None:
        target = checked.target
        key = (target.host, target.port, checked.kind)
        answer = self.answers.setdefault(key, _Answer())
        if answer.addresses is not None and now - answer.resolved_at < RESOLVE_INTERVAL:
            checked.probe_addresses(answer.addresses)
            return
        checked.resolving = True
        answer.waiting = [*(answer.waiting or []), checked]
        if answer.running is not None and now - answer.started < RESOLVE_TIMEOUT:
            return
        if answer.running is not None:  # stuck: ask again
            answer.running.cancel()
            answer.running = None

        def on_resolved(addresses: list[Address] | None, why: str) -> None:
            answer.running = None
            answer.addresses = addresses
            answer.resolved_at = time.monotonic() if addresses else -math.inf
            waiting, answer.waiting = answer.waiting or [], None
            for one in waiting:
                if not one.resolving:
                    continue  # timed out meanwhile
                if addresses is None:
                    one.resolving = False
                    self.finished(one, CheckReason.UNRESOLVED, 0, why)
                else:
                    one.probe_addresses(addresses)

        answer.started = now
        try:
            answer.running = Resolution(
                self.selector, target.host, target.port, checked.kind, on_resolved
            )
        except OSError as error:
            on_resolved(None, f"cannot start the resolver: {error.strerror or error}")

    # -- results ----------------------------------------------------------------------------

    def finished(self, checked: CheckedTarget, reason: CheckReason, detail: int, why: str) -> None:
        """A check of `checked` ended; `why` adds to the reason's words."""
        now = time.monotonic()
        self._observe(now - checked.started)
        checked.started = math.inf
        checked.next_due = max(checked.next_due, now)
        passed = reason == CheckReason.PASSED
        changed = checked.state.record(passed)
        now_ns = time.monotonic_ns()
        for row in checked.rows:
            self.table.record_check(row, checked.state.streak, reason, detail, now_ns)
            self.table.set_up(row, checked.state.up, now_ns)
        if not changed:
            return
        whose = ", ".join(listener_text(entry) for entry in checked.entries)
        listeners = "listeners" if len(checked.entries) > 1 else "listener"
        if passed:
            log.log(
                NOTICE,
                "target '%s' of %s %s is up (%d checks passed in a row)",
                checked.target.text,
                listeners,
                whose,
                checked.state.streak,
            )
        else:
            text = describe(reason, detail, checked.timeout)
            log.warning(
                "target '%s' of %s %s is down: %s (%d checks failed in a row)",
                checked.target.text,
                listeners,
                whose,
                f"{text} ({why})" if why else text,
                -checked.state.streak,
            )

    def _observe(self, seconds: float) -> None:
        histogram = self._histogram
        for index, bound in enumerate(CHECK_DURATION_BOUNDS):
            if seconds <= bound:
                histogram[index] += 1
                break
        else:
            histogram[len(CHECK_DURATION_BOUNDS)] += 1
        histogram[len(CHECK_DURATION_BOUNDS) + 1] += int(seconds * 1e9)

    def histogram(self) -> tuple[list[int], int]:
        """Cumulative bucket counts (the last +Inf) and the sum in ns of check durations."""
        cumulative = []
        running = 0
        for index in range(len(CHECK_DURATION_BOUNDS) + 1):
            running += self._histogram[index]
            cumulative.append(running)
        return cumulative, int(self._histogram[len(CHECK_DURATION_BOUNDS) + 1])
