"""The target table in the shared mapping: one row per (listener, target), and its health.

The master hands rows out from the configuration (`TargetTable.assign`), by a key of the
listener's metrics name and the target as written, so a reload (a re-executed master on
the same mapping) finds every pair that stays where it was, with its health. Its checker
(supervisor/health.py) writes UP and the check fields; UP is 1 for a target that is not
checked. Any worker writes COOLDOWN_UNTIL_NS after a failed connect (`mark_failed`: a
plain store, the last writer wins, which at worst moves a cool-down by the few
microseconds between two workers' failures). A target is usable when UP is 1 and its
cool-down is over (`usable`), which is what workers pick by and what
forkproxy_target_up shows. Fields, units and writers: layout.py. Never logs, never
decides policy.

For a worker (the contract the connecting code builds on):
- `WorkerSpec.targets` is this table; `WorkerSpec.listener_targets[i]` is a
  `ListenerTargets` for `WorkerSpec.listeners[i]`: `rows[j]` is the row of target j of
  the listener's settings (`route_targets(config.settings_for(listener.name))`), and
  `route` its word of the header's ROUND_ROBIN array.
- Pick among the rows with `usable(row, time.monotonic_ns())`. After a failed connect
  attempt to a target (not a failure of this machine: EMFILE and the like), call
  `mark_failed(row, now_ns + cool-down in ns)`; after a connect that succeeded,
  `clear_cooldown(row)` (a store only when a cool-down is set).
- Count in the slot's rows (`Scoreboard.target_row`, `Scoreboard.row`): per attempt
  that failed, `T_CONNECT_ERRORS + connect_error_reason(errno)` and the slot's
  CONNECT_ERRORS; per connection made, T_CONNECTIONS and T_ACTIVE (T_ACTIVE -1 when it
  closes); bytes as they are relayed; per client admitted, the listener row's
  L_CONNECTIONS; per client closed unserved, `L_REFUSED + LISTENER_REFUSALS.index(why)`.
"""

import enum
import errno
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from forkproxy.errors import ForkproxyError
from forkproxy.settings.address import TargetAddress
from forkproxy.settings.config import ListenerSettings
from forkproxy.shared.layout import (
    CHANGED_NS,
    CHECKED_NS,
    CONNECT_ERROR_REASONS,
    COOLDOWN_UNTIL_NS,
    DETAIL,
    KEY,
    MAX_ROUTES,
    MAX_TARGETS,
    REASON,
    ROUND_ROBIN,
    STREAK,
    TARGET_ROW_BYTES,
    TARGETS,
    UP,
    WORD,
)
from forkproxy.shared.mapping import SharedMapping

_STRIDE = TARGET_ROW_BYTES // WORD
_KEY, _UP, _COOLDOWN = KEY // WORD, UP // WORD, COOLDOWN_UNTIL_NS // WORD
_STREAK, _CHECKED, _CHANGED = STREAK // WORD, CHECKED_NS // WORD, CHANGED_NS // WORD
_REASON, _DETAIL = REASON // WORD, DETAIL // WORD

# connect(2) errnos by the `reason` of forkproxy_target_connect_errors_total.
_REFUSED = frozenset({errno.ECONNREFUSED, errno.ENOENT})  # ENOENT: no unix socket file
_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})
_REASON_INDEX = {name: index for index, name in enumerate(CONNECT_ERROR_REASONS)}

RowKey = tuple[str, str]  # (the listener's metrics name, the target as written)


class CheckReason(enum.IntEnum):
    """Why a target's last active check failed (the row's REASON; DETAIL says more)."""

    PASSED = 0
    REFUSED = 1  # DETAIL: the errno (ECONNREFUSED, or ENOENT for a unix socket)
    TIMEOUT = 2
    UNREACHABLE = 3  # DETAIL: the errno
    RESET = 4  # the connection was reset or broken during the check
    HTTP_STATUS = 5  # DETAIL: the status, neither 2xx nor 3xx
    NO_RESPONSE = 6  # closed before a whole status line
    BAD_RESPONSE = 7  # not an HTTP/1 status line
    UNRESOLVED = 8  # the host name did not resolve (DETAIL: the getaddrinfo error)
    ERROR = 9  # any other error (DETAIL: its errno)


def connect_error_reason(code: int | None) -> int:
    """The index in CONNECT_ERROR_REASONS of a failed connect's errno."""
    if code in _REFUSED:
        return _REASON_INDEX["refused"]
    if code == errno.ETIMEDOUT:
        return _REASON_INDEX["timeout"]
    if code in _UNREACHABLE:
        return _REASON_INDEX["unreachable"]
    return _REASON_INDEX["other"]


def route_targets(settings: ListenerSettings) -> tuple[TargetAddress, ...]:
    """The targets of a listener that have rows, in row order: its targets, then its
    backups (--backup), which are checked and counted as the others are."""
    return settings.targets + settings.backup


def row_key_hash(key: RowKey) -> int:
    """KEY of the row for `key`: a 64-bit hash, never 0 (0: a row never used)."""
    listener, target = key
    digest = hashlib.blake2b(f"{listener}\0{target}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


@dataclass(frozen=True, slots=True)
class ListenerTargets:
    """A listener's rows of the target table, and its round-robin word."""

    rows: tuple[int, ...]  # by the index of the target in route_targets(settings)
    route: int  # its index into the header's ROUND_ROBIN array


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where `TargetTable.assign` put each key."""

    rows: dict[RowKey, int]
    fresh: frozenset[int]  # rows handed out now: reset, health unknown
    reused: frozenset[int]  # fresh rows another key had: their old counters are not ours


class TargetTableFull(ForkproxyError):
    """More (listener, target) pairs than the table has rows."""


class TargetTable:
    """The rows of the target table in `mapping`."""

    def __init__(self, mapping: SharedMapping) -> None:
        memory = memoryview(mapping.memory)
        self._words = memory[TARGETS : TARGETS + MAX_TARGETS * TARGET_ROW_BYTES].cast("q")
        self._turns = memory[ROUND_ROBIN : ROUND_ROBIN + MAX_ROUTES * WORD].cast("q")

    # -- workers (and the master) -----------------------------------------------------------

    def usable(self, row: int, now_ns: int) -> bool:
        """Up (or not checked) and not cooling down after a failed connect."""
        base = row * _STRIDE
        words = self._words
        return words[base + _UP] != 0 and words[base + _COOLDOWN] <= now_ns

    def mark_failed(self, row: int, until_ns: int) -> None:
        """A connect to the row's target failed: workers skip it until `until_ns`
        (CLOCK_MONOTONIC, `time.monotonic_ns()`)."""
        self._words[row * _STRIDE + _COOLDOWN] = until_ns

    def clear_cooldown(self, row: int) -> None:
        """A connect to the row's target succeeded: its cool-down, if any, is over."""
        index = row * _STRIDE + _COOLDOWN
        if self._words[index]:
            self._words[index] = 0

    def next_turn(self, route: int) -> int:
        """Round-robin: the route's counter word, counted on by one. A plain read and
        write: two workers picking at once may read the same turn, which only skews
        the rotation by one pick."""
        turns = self._turns
        turn = turns[route]
        turns[route] = turn + 1 if turn < (1 << 62) else 0
        return int(turn)

    def is_up(self, row: int) -> bool:
        return self._words[row * _STRIDE + _UP] != 0

    def cooldown_until(self, row: int) -> int:
        return int(self._words[row * _STRIDE + _COOLDOWN])

    # -- the master -------------------------------------------------------------------------

    def assign(self, keys: Iterable[RowKey]) -> Assignment:
        """A row for each key: the row it has if it has one, else a row never used,
        else one whose key is not among `keys` (a pair a reload dropped; its workers may
        still be draining, so such rows are taken last). Fresh rows are reset: up, no
        cool-down, no check yet. TargetTableFull if the keys outnumber the rows."""
        wanted = list(dict.fromkeys(keys))
        if len(wanted) > MAX_TARGETS:
            raise TargetTableFull(
                f"too many targets: {len(wanted)} (listener, target) pairs, at most {MAX_TARGETS}"
            )
        words = self._words
        by_hash = {row_key_hash(key): key for key in wanted}
        rows: dict[RowKey, int] = {}
        never_used: list[int] = []
        released: list[int] = []
        for row in range(MAX_TARGETS):
            key_hash = int(words[row * _STRIDE + _KEY])
            key = by_hash.get(key_hash)
            if key is not None and key not in rows:
                rows[key] = row
            elif key_hash == 0:
                never_used.append(row)
            else:
                released.append(row)
        free = iter(never_used + released)
        was_used = set(released)
        reused = set()
        fresh = set()
        for key in wanted:
            if key in rows:
                continue
            row = next(free)
            if row in was_used:
                reused.add(row)
            fresh.add(row)
            rows[key] = row
            base = row * _STRIDE
            words[base : base + _STRIDE] = memoryview(bytes(TARGET_ROW_BYTES)).cast("q")
            words[base + _UP] = 1
            words[base + _KEY] = row_key_hash(key)
        return Assignment(rows, frozenset(fresh), frozenset(reused))

    def high_water(self) -> int:
        """Rows [0, this) have ever been handed out."""
        words = self._words
        for row in range(MAX_TARGETS - 1, -1, -1):
            if words[row * _STRIDE + _KEY]:
                return row + 1
        return 0

    def set_up(self, row: int, up: bool, now_ns: int) -> None:
        base = row * _STRIDE
        if (self._words[base + _UP] != 0) != up:
            self._words[base + _UP] = int(up)
            self._words[base + _CHANGED] = now_ns

    def record_check(
        self, row: int, streak: int, reason: CheckReason, detail: int, now_ns: int
    ) -> None:
        """The checker's fields after a check ended."""
        base = row * _STRIDE
        words = self._words
        words[base + _STREAK] = streak
        words[base + _REASON] = reason
        words[base + _DETAIL] = detail
        words[base + _CHECKED] = now_ns

    def forget_checks(self, row: int) -> None:
        """The row's target is no longer checked: up, as far as checks go."""
        base = row * _STRIDE
        words = self._words
        words[base + _UP] = 1
        for field in (_STREAK, _REASON, _DETAIL, _CHECKED):
            words[base + field] = 0

    def check_state(self, row: int) -> tuple[int, CheckReason, int, int, int]:
        """(STREAK, REASON, DETAIL, CHECKED_NS, CHANGED_NS) of the row."""
        base = row * _STRIDE
        words = self._words
        return (
            int(words[base + _STREAK]),
            CheckReason(words[base + _REASON]),
            int(words[base + _DETAIL]),
            int(words[base + _CHECKED]),
            int(words[base + _CHANGED]),
        )

    def close(self) -> None:
        """Drop this process's view (the mapping is closed by its owner)."""
        for view in (self._words, self._turns):
            try:
                view.release()
            except BufferError:
                pass


def listener_targets(
    names: Sequence[str], targets: Sequence[Sequence[TargetAddress]], rows: dict[RowKey, int]
) -> tuple[ListenerTargets, ...]:
    """Each listener's rows, from its metrics name and its targets (`route_targets`);
    listeners of one name share their rows and their round-robin word."""
    routes: dict[str, int] = {}
    result = []
    for name, addresses in zip(names, targets, strict=True):
        route = routes.setdefault(name, len(routes) % MAX_ROUTES)
        result.append(
            ListenerTargets(tuple(rows[(name, address.text)] for address in addresses), route)
        )
    return tuple(result)
