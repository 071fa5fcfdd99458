"""The compiled engine's datagram listeners: which ones it reads, and its lines about them.

The engine (csrc/datagram.c) reads a worker's datagram listeners when it runs and every
one of their targets is an address (the Python engine, datagram.py, resolves host-name
targets for each session and stays the reference). What it drops it counts in the
listener's row and reports through hooks.on_event, rate-limited, with a count:
`DatagramEvents` logs each with the Python engine's words (datagram_drops.py's `Drops`,
datagram.py's target line) and rate limits. Never reads or sends a datagram itself.
"""

import logging
import os
from collections.abc import Callable, Sequence
from types import ModuleType

from forkproxy import logs
from forkproxy.relay.targets import COOLDOWN
from forkproxy.settings.config import Config
from forkproxy.shared.listener import Listener

log = logging.getLogger("forkproxy")

Handler = Callable[[int, int, int, object], None]


def compiled_reads(config: Config, listeners: Sequence[Listener]) -> bool:
    """Whether the compiled engine can read these datagram listeners: none of their
    targets is a host name (resolved per session by the Python engine)."""
    return not any(
        target.needs_resolving
        for listener in listeners
        for target in config.settings_for(listener.name).targets
    )


def _strerror(error: int) -> str:
    return os.strerror(error) if error else "unknown error"


class DatagramEvents:
    """The engine's datagram events, logged as the Python engine logs its drops."""

    def __init__(self, module: ModuleType, listeners: Sequence[Listener], config: Config) -> None:
        self.listeners = tuple(listeners)  # by the engine's datagram listener index
        self.connections_max = config.connections_max
        settings = [config.settings_for(listener.name) for listener in self.listeners]
        self.limits = [one.connections_max_per_source for one in settings]
        # Each listener's targets as TargetGroup.label names them: 'a:1' or 'b:2'.
        self.targets = [" or ".join(f"'{t.text}'" for t in one.targets) for one in settings]
        self.cap_lines = logs.RateLimitedLog(log, logging.WARNING)  # and busy
        self.per_source_lines = logs.RateLimitedLog(log, logging.WARNING)
        self.send_lines = logs.RateLimitedLog(log, logging.WARNING)
        self.session_lines = logs.RateLimitedLog(log, logging.WARNING)
        self.other_lines = logs.RateLimitedLog(log, logging.WARNING)
        self.target_lines = logs.RateLimitedLog(log, logging.WARNING)
        self.handlers: dict[int, Handler] = {
            module.EVENT_DG_CAP: self._cap,
            module.EVENT_DG_SOURCE: self._per_source,
            module.EVENT_DG_BUSY: self._busy,
            module.EVENT_DG_TRUNCATED: self._truncated,
            module.EVENT_DG_SEND_ERROR: self._send_error,
            module.EVENT_DG_REFUSED: self._refused,
            module.EVENT_DG_REPLY_ERROR: self._reply_error,
            module.EVENT_DG_NO_SESSION: self._no_session,
            module.EVENT_DG_READ_ERROR: self._read_error,
            module.EVENT_DG_TARGET_FAILED: self._target_failed,
        }

    def _cap(self, count: int, _error: int, _index: int, client: object) -> None:
        self.cap_lines.log_count(
            count,
            "connection cap %d reached, dropping datagrams from new client %s",
            self.connections_max,
            client,
        )

    def _per_source(self, count: int, _error: int, index: int, client: object) -> None:
        self.per_source_lines.log_count(
            count,
            "connection limit %d per source reached, dropping datagrams from new client %s",
            self.limits[index],
            client,
        )

    def _busy(self, count: int, _error: int, _index: int, client: object) -> None:
        self.cap_lines.log_count(
            count, "admission lock busy, dropping a datagram from new client %s", client
        )

    def _truncated(self, count: int, size: int, _index: int, client: object) -> None:
        self.other_lines.log_count(
            count,
            "datagram of %d bytes from %s is larger than the buffer, dropping it",
            size,
            client,
        )

    def _send_error(self, count: int, error: int, index: int, subject: object) -> None:
        client, target = self._client_and_target(index, subject)
        self.send_lines.log_count(
            count,
            "cannot send a datagram from %s to %s: %s, dropping it",
            client,
            target,
            _strerror(error),
        )

    def _refused(self, count: int, error: int, index: int, subject: object) -> None:
        client, target = self._client_and_target(index, subject)
        self.send_lines.log_count(
            count, "datagram from %s not delivered to %s: %s", client, target, _strerror(error)
        )

    def _client_and_target(self, index: int, subject: object) -> tuple[object, str]:
        """The (client, target) the engine names, the target as the Python lines quote it;
        the listener's targets if it named none."""
        if isinstance(subject, tuple) and len(subject) == 2:
            client, target = subject
            return client, f"'{getattr(target, 'text', target)}'"
        return subject, self.targets[index]

    def _reply_error(self, count: int, error: int, _index: int, client: object) -> None:
        self.send_lines.log_count(
            count, "cannot send a reply to %s: %s, dropping it", client, _strerror(error)
        )

    def _no_session(self, count: int, error: int, index: int, client: object) -> None:
        self.session_lines.log_count(
            count,
            "cannot open a datagram session to %s for %s: %s, dropping its datagrams",
            self.targets[index],
            client,
            _strerror(error),
        )

    def _read_error(self, count: int, error: int, index: int, _subject: object) -> None:
        self.other_lines.log_count(
            count,
            "cannot read %s: %s, ignoring",
            self.listeners[index].label,
            _strerror(error),
        )

    def _target_failed(self, count: int, error: int, _index: int, target: object) -> None:
        self.target_lines.log_count(
            count,
            "datagram target '%s' refused: %s; new sessions go to the other targets, "
            "and to it only after them for %gs",
            getattr(target, "text", target),
            _strerror(error),
            COOLDOWN,
        )
