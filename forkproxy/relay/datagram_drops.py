"""Datagrams a worker drops from one listener: each counted by reason in the listener's
row of the worker's slot, and logged at most once per interval with how many.

Reasons (DG_DROP_REASONS, the `reason` label of forkproxy_datagrams_dropped_total): cap
and per_source (a new client at the connection cap or at its source's), busy (the
admission lock stayed taken), truncated (larger than the worker's message buffer),
send_error (the kernel refused to send it, to the target or back to the client),
no_session (no socket to any target could be opened). Counts before it logs, so a
counter is never behind what the log says. Never sends or closes.
"""

import logging

from forkproxy import logs
from forkproxy.settings.address import format_sockaddr
from forkproxy.shared.layout import DG_DROP_REASONS, DG_DROPPED

_CAP, _PER_SOURCE, _BUSY, _TRUNCATED, _SEND_ERROR, _NO_SESSION = (
    DG_DROPPED + DG_DROP_REASONS.index(reason)
    for reason in ("cap", "per_source", "busy", "truncated", "send_error", "no_session")
)

log = logging.getLogger("forkproxy")


def client_text(family: int, client: object) -> str:
    """A datagram client's address as an operator reads it."""
    if client is None:
        return "an unbound unix client"  # it sent from no address: replies cannot reach it
    return format_sockaddr(family, client)


class Drops:
    """One listener's dropped datagrams: counters in its row, rate-limited warnings."""

    __slots__ = ("row", "_cap", "_per_source", "_send", "_session", "_other")

    def __init__(self, row: memoryview) -> None:
        self.row = row
        self._cap = logs.RateLimitedLog(log, logging.WARNING)
        self._per_source = logs.RateLimitedLog(log, logging.WARNING)
        self._send = logs.RateLimitedLog(log, logging.WARNING)
        self._session = logs.RateLimitedLog(log, logging.WARNING)
        self._other = logs.RateLimitedLog(log, logging.WARNING)

    def cap(self, family: int, client: object, cap: int) -> None:
        self.row[_CAP] += 1
        self._cap.log(
            "connection cap %d reached, dropping datagrams from new client %s",
            cap,
            client_text(family, client),
        )

    def per_source(self, family: int, client: object, limit: int) -> None:
        self.row[_PER_SOURCE] += 1
        self._per_source.log(
            "connection limit %d per source reached, dropping datagrams from new client %s",
            limit,
            client_text(family, client),
        )

    def busy(self, family: int, client: object) -> None:
        self.row[_BUSY] += 1
        self._cap.log(
            "admission lock busy, dropping a datagram from new client %s",
            client_text(family, client),
        )

    def truncated(self, family: int, client: object, count: int, size: int) -> None:
        self.row[_TRUNCATED] += 1
        self._other.log(
            "datagram of %d bytes from %s is larger than the %d-byte buffer, dropping it",
            count,
            client_text(family, client),
            size,
        )

    def to_target(self, family: int, client: object, target: str, error: OSError) -> None:
        """A datagram the kernel would not send to the target."""
        self.row[_SEND_ERROR] += 1
        self._send.log(
            "cannot send a datagram from %s to %s: %s, dropping it",
            client_text(family, client),
            target,
            error.strerror or error,
        )

    def refused(self, family: int, client: object, target: str, error: OSError) -> None:
        """An earlier datagram the target's host refused, reported on the session socket."""
        self.row[_SEND_ERROR] += 1
        self._send.log(
            "datagram from %s not delivered to %s: %s",
            client_text(family, client),
            target,
            error.strerror or error,
        )

    def reply(self, family: int, client: object, error: OSError) -> None:
        """A reply the kernel would not send to its client (its queue full, ...)."""
        self.row[_SEND_ERROR] += 1
        self._send.log(
            "cannot send a reply to %s: %s, dropping it",
            client_text(family, client),
            error.strerror or error,
        )

    def held(self) -> None:
        """A datagram held for a target that ended before taking it."""
        self.row[_SEND_ERROR] += 1

    def no_session(
        self, family: int, client: object, targets: str, error: OSError, count: int
    ) -> None:
        """`count` datagrams of a client for whom no session socket could be opened."""
        self.row[_NO_SESSION] += count
        self._session.log(
            "cannot open a datagram session to %s for %s: %s, dropping its datagrams",
            targets,
            client_text(family, client),
            error.strerror or error,
        )

    def pending(self) -> None:
        """One datagram more than a session holds while its target's name is resolved."""
        self.row[_NO_SESSION] += 1

    def read_error(self, label: str, error: OSError) -> None:
        self._other.log("cannot read %s: %s, ignoring", label, error)
