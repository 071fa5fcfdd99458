"""How a worker turns away a client it accepted: counted refused, closed, logged.

`Refusals` closes a client that admission refused (the global cap, the admission lock
busy, its source's limit) and one whose taking-in failed with an internal error, which
also gives back the admission it held; each reason is one warning per interval, with a
count. Never admits, and never keeps a client.
"""

import logging
import os
import socket

from forkproxy import logs
from forkproxy.relay.internal_error import InternalErrors
from forkproxy.relay.splice import NO_TOKEN, reset_on_close
from forkproxy.settings.address import format_sockaddr
from forkproxy.settings.config import Config
from forkproxy.shared.admission import REFUSED_BUSY, REFUSED_CAP, REFUSED_SOURCE, Admitter
from forkproxy.shared.layout import L_REFUSED, LISTENER_REFUSALS
from forkproxy.shared.scoreboard import REFUSED

log = logging.getLogger("forkproxy")

# A listener row's word for each refusal of admission (layout.py).
REFUSAL_WORDS = {
    REFUSED_CAP: L_REFUSED + LISTENER_REFUSALS.index("cap"),
    REFUSED_SOURCE: L_REFUSED + LISTENER_REFUSALS.index("per_source"),
    REFUSED_BUSY: L_REFUSED + LISTENER_REFUSALS.index("busy"),
}
NO_TARGET = L_REFUSED + LISTENER_REFUSALS.index("no_target")


class Refusals:
    """How a worker turns a client away: counted refused, closed, one line per interval."""

    __slots__ = (
        "slot",
        "admitter",
        "connections_max",
        "internal_errors",
        "at_cap",
        "per_source_lines",
    )

    def __init__(
        self, slot: memoryview, admitter: Admitter, config: Config, errors: InternalErrors
    ) -> None:
        self.slot = slot
        self.admitter = admitter
        self.connections_max = config.connections_max
        self.internal_errors = errors
        self.at_cap = logs.RateLimitedLog(log, logging.WARNING)  # and busy
        self.per_source_lines = logs.RateLimitedLog(log, logging.WARNING)

    def refuse(
        self,
        fd: int,
        family: int,
        peer: object,
        why: int,
        source_limit: int,
        counters: memoryview,
    ) -> None:
        """Admission refused the client (`why`: REFUSED_CAP, REFUSED_BUSY, REFUSED_SOURCE;
        `source_limit`: its listener's per-source limit; `counters`: its listener's row)."""
        # Before the close: a kill between them must not hide it.
        self.slot[REFUSED] += 1
        counters[REFUSAL_WORDS[why]] += 1
        os.close(fd)
        if why == REFUSED_CAP:
            self.at_cap.log(
                "connection cap %d reached, refusing connection from %s",
                self.connections_max,
                format_sockaddr(family, peer),
            )
        elif why == REFUSED_BUSY:
            self.at_cap.log(
                "admission lock busy, refusing connection from %s",
                format_sockaddr(family, peer),
            )
        else:
            self.per_source_lines.log(
                "connection limit %d per source reached, refusing connection from %s",
                source_limit,
                format_sockaddr(family, peer),
            )

    def drop(
        self,
        fd: int,
        client: socket.socket | None,
        token: int,
        family: int,
        peer: object,
        error: Exception,
    ) -> None:
        """An internal error while taking a client in: close it (with an RST once it has a
        socket object), then give back its admission if it holds one, count it refused,
        and say so once."""
        self.slot[REFUSED] += 1
        try:
            if client is None:
                os.close(fd)
            else:
                reset_on_close(client)
                client.close()
        finally:
            if token != NO_TOKEN:
                self.admitter.release(token)
            self.internal_errors.report(
                f"taking in the connection from {format_sockaddr(family, peer)}", error
            )
