"""Which target a client goes to, by the shared target table: balancing, backups, retries.

A route whose targets have rows in the mapping's target table (shared/targets_table.py,
which gives the contract) gets a `Balancer`. It picks among the targets that are usable
for every worker at once (UP, as the master's checks say, and not cooling down after a
failed connect, which any worker writes), by the route's --balance mode:

- round-robin: the route's counter word in the mapping's header, shared by all workers;
- least-connections: the fewest connections open now, summed over every worker's slot
  (ties go round-robin);
- source: a rendezvous hash of the client's IP address and each target, so a client
  keeps its target while that target is usable, and only the clients of a target that
  goes away move;
- first: the first usable target, in the order given (failover order).

--backup targets are picked only when no other target is usable. Each failed connect
attempt cools its target down for all workers and is counted in this worker's row of
that target, by reason; each connect that succeeds ends its target's cool-down. A client
whose every usable target failed tries the ones cooling down (soonest back first): it
fails only when every target not found down by the checks has failed it. With
--connect-retry, a client whose every target refused (nothing listening yet) is kept,
its bytes unread, and tried again after 50 ms, then twice as long each time up to 1 s,
until the retry time since it was accepted is over. Never logs: failures go to the
worker's `on_target_failed`.
"""

import errno
import hashlib
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from forkproxy.relay.poller import Readiness
from forkproxy.relay.target_connect import SocketOptions
from forkproxy.relay.targets import (
    COOLDOWN,
    LOCAL_ERRNOS,
    FailoverConnect,
    OnConnected,
    OnFailed,
    OnTargetFailed,
)
from forkproxy.settings.address import TargetAddress
from forkproxy.shared.layout import CONNECT_ERRORS, T_ACTIVE, T_CONNECT_ERRORS
from forkproxy.shared.per_source import source_key
from forkproxy.shared.scoreboard import Scoreboard
from forkproxy.shared.targets_table import TargetTable, connect_error_reason

if TYPE_CHECKING:
    import asyncio

ROUND_ROBIN = "round-robin"
LEAST_CONNECTIONS = "least-connections"
SOURCE = "source"
FIRST = "first"

RETRY_FIRST_PAUSE = 0.05  # seconds before the first retry round; doubled each round
RETRY_MAX_PAUSE = 1.0
# A target that refuses is not listening (yet): the errors --connect-retry waits out.
REFUSED_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENOENT})
# Failures of this machine that a connector retries itself after a pause: not counted.
_RETRIED_LOCALLY = frozenset({errno.EMFILE, errno.ENFILE})
_COOLDOWN_NS = int(COOLDOWN * 1e9)
_MASK64 = (1 << 64) - 1
_NO_KEY = bytes(16)


def source_score(key: bytes, salt: int) -> int:
    """The rendezvous score of a client (its 16-byte source key) for a target (`salt`,
    a 64-bit hash of the target as written): the client goes to the highest."""
    low = int.from_bytes(key[:8], "little")
    high = int.from_bytes(key[8:], "little")
    mixed = ((low * 0x9E3779B97F4A7C15) & _MASK64) ^ high ^ salt
    mixed = (mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    mixed = (mixed ^ (mixed >> 27)) * 0x94D049BB133111EB & _MASK64
    return mixed ^ (mixed >> 31)


def target_salt(target: TargetAddress) -> int:
    digest = hashlib.blake2b(target.text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Balancer:
    """The targets of one route and how they are picked, by the shared target table."""

    __slots__ = (
        "targets",
        "label",
        "timeout",
        "options",
        "mode",
        "retry",
        "normal",
        "rows",
        "counters",
        "route",
        "table",
        "scoreboard",
        "slot",
        "salts",
        "on_target_failed",
        "by_source",
    )

    def __init__(
        self,
        targets: Sequence[TargetAddress],
        backups: Sequence[TargetAddress],
        rows: Sequence[int],
        route: int,
        table: TargetTable,
        scoreboard: Scoreboard,
        slot: int,
        mode: str = ROUND_ROBIN,
        timeout: float = math.inf,
        options: SocketOptions = (),
        retry: float = 0.0,
        on_target_failed: OnTargetFailed | None = None,
    ) -> None:
        self.targets = (*targets, *backups)  # by index: rows[i], counters[i]
        self.label = " or ".join(f"'{target.text}'" for target in self.targets)
        self.normal = len(targets)  # targets [normal, len) are backups
        self.rows = tuple(rows)  # their rows of the target table
        assert len(self.rows) == len(self.targets)
        self.route = route  # the route's round-robin word
        self.table = table
        self.scoreboard = scoreboard
        self.slot = scoreboard.slot(slot)  # this worker's: CONNECT_ERRORS
        # This worker's row of counters for each target.
        self.counters = tuple(scoreboard.target_row(slot, row) for row in self.rows)
        self.mode = mode
        self.by_source = mode == SOURCE
        self.salts = tuple(target_salt(target) for target in self.targets)
        self.timeout = timeout  # per target, --connect-timeout
        self.options = options  # TCP options of target sockets
        self.retry = retry  # --connect-retry, seconds; 0: none
        self.on_target_failed = on_target_failed

    def connect(
        self,
        loop: "asyncio.AbstractEventLoop",
        io: Readiness,
        on_connected: OnConnected,
        on_failed: OnFailed,
        family: int = 0,
        peer: object = None,
    ) -> "BalancedConnect":
        """Start connecting one client (`family`, `peer`: its address, for --balance
        source); exactly one of the callbacks will run."""
        key = (source_key(family, peer) or _NO_KEY) if self.by_source else _NO_KEY
        attempt = BalancedConnect(self, loop, io, on_connected, on_failed, key)
        attempt.start()
        return attempt

    def order(self, key: bytes = _NO_KEY) -> list[int]:
        """Target indexes to try: the usable ones as the mode picks them (backups only if
        no other is usable), then those cooling down, soonest back first. Targets the
        checks found down are left out."""
        now = time.monotonic_ns()
        table = self.table
        rows = self.rows
        usable = [index for index in range(len(rows)) if table.usable(rows[index], now)]
        normal = [index for index in usable if index < self.normal]
        # Backups in the order given, after the others: if these all fail this client.
        picked = self._pick(normal, key) + usable[len(normal) :]
        cooling = sorted(
            (i for i in range(len(rows)) if i not in usable and table.is_up(rows[i])),
            key=lambda i: table.cooldown_until(rows[i]),
        )
        return picked + cooling

    def _pick(self, usable: list[int], key: bytes) -> list[int]:
        mode = self.mode
        if mode == FIRST or len(usable) <= 1:
            return usable
        if mode == SOURCE:
            salts = self.salts
            return sorted(usable, key=lambda index: source_score(key, salts[index]), reverse=True)
        if mode == LEAST_CONNECTIONS:
            live = self.scoreboard.target_live
            rows = self.rows
            active = {index: live(rows[index], T_ACTIVE) for index in usable}
            fewest = min(active.values())
            tied = [index for index in usable if active[index] == fewest]
            others = sorted((i for i in usable if active[i] != fewest), key=active.__getitem__)
            return self._rotate(tied) + others  # ties: round-robin
        return self._rotate(usable)

    def _rotate(self, indexes: list[int]) -> list[int]:
        """`indexes` from the route's next turn on (the counter all workers share)."""
        if len(indexes) == 1:
            return indexes
        start = self.table.next_turn(self.route) % len(indexes)
        return indexes[start:] + indexes[:start]

    def failed(self, index: int, error: OSError) -> None:
        """A connect attempt to target `index` failed: count it, and cool the target down
        for every worker."""
        self.count_error(index, error.errno)
        now = time.monotonic_ns()
        row = self.rows[index]
        newly = self.table.cooldown_until(row) <= now
        self.table.mark_failed(row, now + _COOLDOWN_NS)
        # With one target the client's own failure says it all: no line of its own.
        if self.on_target_failed is not None and len(self.targets) > 1:
            self.on_target_failed(self.targets[index], error, newly)

    def count_error(self, index: int, code: int | None) -> None:
        """Count a failed connect attempt to target `index` (its reason by `code`)."""
        self.counters[index][T_CONNECT_ERRORS + connect_error_reason(code)] += 1
        self.slot[CONNECT_ERRORS] += 1

    def succeeded(self, index: int) -> None:
        self.table.clear_cooldown(self.rows[index])


class BalancedConnect(FailoverConnect):
    """One client's connection: each target in the balancer's order until one connects;
    with --connect-retry, more rounds while every target refuses."""

    __slots__ = ("balancer", "key", "refused", "retry_deadline", "pause", "timer")

    def __init__(
        self,
        balancer: Balancer,
        loop: "asyncio.AbstractEventLoop",
        io: Readiness,
        on_connected: OnConnected,
        on_failed: OnFailed,
        key: bytes,
    ) -> None:
        FailoverConnect.__init__(self, balancer, loop, io, on_connected, on_failed)
        self.balancer = balancer
        self.key = key  # the client's source key, for --balance source
        self.refused = True  # every attempt of this round was refused
        self.retry_deadline = time.monotonic() + balancer.retry if balancer.retry else 0.0
        self.pause = RETRY_FIRST_PAUSE
        self.timer: asyncio.TimerHandle | None = None  # the next retry round

    def start(self) -> None:
        self.timer = None
        self.order = self.balancer.order(self.key)
        self.step = 0
        self.refused = True
        self._try_next(None)

    def _exhausted(self, error: OSError | None) -> None:
        if self.refused and self._retry():
            return
        self.on_failed(error or OSError(errno.EHOSTUNREACH, "no target is up"))

    def _retry(self) -> bool:
        """--connect-retry: another round after a pause, if there is time left for it."""
        left = self.retry_deadline - time.monotonic()
        if left <= 0:
            return False
        pause = min(self.pause, left)
        self.pause = min(self.pause * 2, RETRY_MAX_PAUSE)
        self.timer = self.loop.call_later(pause, self.start)
        return True

    def _on_target_failed(self, error: OSError) -> None:
        code = error.errno
        if code in LOCAL_ERRNOS:  # this machine's failure: no other target is tried
            if code not in _RETRIED_LOCALLY:
                self.balancer.count_error(self.order[self.step - 1], code)
        elif code not in REFUSED_ERRNOS:
            self.refused = False
        FailoverConnect._on_target_failed(self, error)

    def cancel(self) -> None:
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        FailoverConnect.cancel(self)
