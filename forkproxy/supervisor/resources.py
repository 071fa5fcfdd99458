"""What a master holds: listening and metrics sockets, the shared mapping, the event pipe.

Opened at start (`open`), or taken over from the image a reload re-executed (`adopt`),
with the listeners then made what the new settings ask (`apply`): an address --listen
still names keeps its socket (nothing re-bound, the accept queue intact), a new one is
bound, one no longer named is retired, and closed (its socket file unlinked) once the old
generation has been told to drain (`close_retiring`). Sockets systemd passed are never
changed. Never forks.
"""

import dataclasses
import errno
import logging
import os
import resource
import socket
import struct

from forkproxy.errors import ForkproxyError
from forkproxy.settings.address import ListenAddress
from forkproxy.settings.config import Config
from forkproxy.shared.admission import Admission
from forkproxy.shared.layout import mapping_bytes, source_entries
from forkproxy.shared.listener import Listener
from forkproxy.shared.mapping import LayoutMismatch, SharedMapping
from forkproxy.shared.protocol import EVENT_FORMAT, EVENT_SIZE, WorkerSpec
from forkproxy.shared.scoreboard import Scoreboard
from forkproxy.supervisor.activation import METRICS_FD_NAME
from forkproxy.supervisor.check import ListenerKind, check_settings_for
from forkproxy.supervisor.limits import raise_fd_limit
from forkproxy.supervisor.listeners import bind_listener, close_listeners, open_listeners
from forkproxy.supervisor.reexec_state import ReexecState, SocketRecord, address_key
from forkproxy.supervisor.target_rows import TargetRows

log = logging.getLogger("forkproxy")


class Resources:
    """The master's descriptors and shared memory; `close` releases them all."""

    def __init__(self) -> None:
        self.listeners: list[Listener] = []
        # fd -> address_key of the --listen address a listener was bound for: those are
        # ours to close and unlink. Empty when systemd passed the listeners.
        self.addresses: dict[int, str] = {}
        self.metrics_listeners: list[Listener] = []  # the master's own: workers close theirs
        self.metrics_addresses: dict[int, str] = {}  # as `addresses`, for --metrics
        self.retiring: list[Listener] = []  # dropped by a reload; closed once old workers drain
        self.added: list[Listener] = []  # bound by a reload; closed if it is given up
        # The listeners and addresses before a reload, which `revert` restores.
        self.before_reload: tuple[list[Listener], dict[int, str]] | None = None
        self.mapping: SharedMapping | None = None  # scoreboard and caps; ours to close
        self.scoreboard: Scoreboard | None = None
        self.admission: Admission | None = None
        self.events: tuple[int, int] | None = None  # workers' event pipe: read, write

    @property
    def owns_listeners(self) -> bool:
        """Bound from --listen (ours to close at shutdown), not passed by systemd."""
        return bool(self.addresses)

    # -- a fresh start ---------------------------------------------------------------------

    def start(self, config: Config, passed: list[tuple[int, str]]) -> None:
        """What a master that is not a reload's holds: the sockets (`open`), checked
        against `config`, then the shared mapping. Raises ForkproxyError, OSError."""
        fd_limit = raise_fd_limit()
        self.open(config, passed)
        named = [(one.name, one.label, one.kind) for one in self.listeners]
        check_settings_for(config, named, fd_limit)
        self.create_shared(config)

    def open(self, config: Config, passed: list[tuple[int, str]]) -> None:
        """Adopt the sockets systemd passed, or bind --listen; the metrics sockets.
        Raises ForkproxyError, OSError."""
        self.listeners, self.metrics_listeners, bound = open_listeners(config, passed)
        if bound:  # ours to close and unlink, and to keep across a reload by address
            pairs = zip(self.listeners, config.listen, strict=True)
            self.addresses = {listener.fd: address_key(address) for listener, address in pairs}
        # --metrics is bound only if systemd passed no socket named "metrics".
        if config.metrics is not None and self.metrics_listeners:
            log.info("systemd passed a '%s' socket: ignoring --metrics", METRICS_FD_NAME)
        elif config.metrics is not None:
            metrics = bind_listener(config.metrics, config.socket_mode)
            self.metrics_listeners = [metrics]
            self.metrics_addresses = {metrics.fd: address_key(config.metrics)}

    def create_shared(self, config: Config) -> None:
        """A new shared mapping, its caps, and the event pipe. Raises ForkproxyError,
        OSError."""
        self.mapping = shared_mapping(config)
        self.scoreboard = Scoreboard(self.mapping, len(self.listeners))
        self.admission = Admission.set_up(
            self.mapping, config.connections_max, source_limit(config)
        )
        self.events = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- a reload: the previous image's, then the new settings' ----------------------------

    def adopt(self, state: ReexecState) -> None:
        """Everything the previous image held, on the same descriptors, close-on-exec
        again. Raises ForkproxyError if the shared mapping is not of this layout."""
        for fd in state.descriptors():
            os.set_inheritable(fd, False)
        self.events = state.events
        self.listeners = [_adopt(record) for record in state.listeners]
        self.addresses = {r.fd: r.address for r in state.listeners if r.address is not None}
        self.metrics_listeners = [_adopt(record) for record in state.metrics_listeners]
        self.metrics_addresses = {
            r.fd: r.address for r in state.metrics_listeners if r.address is not None
        }
        try:
            self.mapping = SharedMapping.adopt(state.mapping_fd)
        except LayoutMismatch as error:
            raise ForkproxyError(f"restart needed: {error}") from None
        # Rows as wide as any worker, of any image before, may have written.
        self.scoreboard = Scoreboard(self.mapping, state.listener_rows)
        self.admission = Admission(self.mapping)

    def planned(self, config: Config) -> list[ListenerKind]:
        """(name, label, kind) of the listeners `apply(config)` would leave, for the
        checks."""
        if not self.owns_listeners:
            return [(one.name, one.label, one.kind) for one in self.listeners]
        labels = {self.addresses.get(listener.fd): listener.label for listener in self.listeners}
        return [
            (a.name, labels.get(address_key(a), a.text.removeprefix(f"{a.name}=")), a.kind)
            for a in config.listen
        ]

    def apply(self, config: Config) -> None:
        """Make the --listen and --metrics sockets what `config` names. Nothing changes
        if an address cannot be bound (ForkproxyError)."""
        listeners, addresses = self.listeners, self.addresses
        added: list[Listener] = []
        retiring: list[Listener] = []
        metrics_added: list[Listener] = []
        try:
            if self.owns_listeners:
                if not config.listen:
                    raise ForkproxyError(
                        "no sockets passed in by systemd (LISTEN_FDS) and no --listen address given"
                    )
                listeners, addresses, added, retiring = _rebind(
                    self.listeners, self.addresses, config.listen, config.socket_mode
                )
            elif config.listen:
                log.info("systemd passed %d sockets: ignoring --listen", len(self.listeners))
            metrics = self._metrics_for(config, metrics_added)
        except BaseException:
            close_listeners(added + metrics_added)
            raise
        self.before_reload = (self.listeners, self.addresses)
        self.listeners, self.addresses = listeners, addresses
        if self.scoreboard is not None:  # the old workers' rows, and the new ones'
            self.scoreboard.widen_listener_rows(len(listeners))
        self.added, self.retiring = added, retiring
        if metrics is not None:
            old = self.metrics_listeners
            self.metrics_listeners, self.metrics_addresses = metrics
            close_listeners([listener for listener in old if listener not in metrics[0]])

    def _metrics_for(
        self, config: Config, added: list[Listener]
    ) -> tuple[list[Listener], dict[int, str]] | None:
        """The metrics sockets `config` asks for, or None to keep those there are."""
        passed = [m for m in self.metrics_listeners if m.fd not in self.metrics_addresses]
        if passed:
            return None
        if config.metrics is None:
            return [], {}
        key = address_key(config.metrics)
        for listener in self.metrics_listeners:
            if self.metrics_addresses.get(listener.fd) == key:
                return [listener], {listener.fd: key}
        metrics = bind_listener(config.metrics, config.socket_mode)
        added.append(metrics)  # closed with the others if what follows fails
        return [metrics], {metrics.fd: key}

    def close_retiring(self) -> None:
        """The old generation has been told to drain: close the listeners the reload
        dropped (the draining workers close their own copies)."""
        if self.retiring:
            log.info("closing %s", ", ".join(listener.label for listener in self.retiring))
            close_listeners(self.retiring)
        self.retiring = []
        self.added = []
        self.before_reload = None

    def revert(self) -> None:
        """The reload is given up before its workers served: the listeners it added
        close, those it dropped stay. (A changed --metrics address stays changed.)"""
        if self.before_reload is None:
            return
        close_listeners(self.added)
        self.listeners, self.addresses = self.before_reload
        self.retiring, self.added, self.before_reload = [], [], None

    # -- for the workers, the next image, and the end ----------------------------------------

    def worker_spec(
        self, config: Config, heartbeat_interval: float, targets: TargetRows
    ) -> WorkerSpec:
        """What every new worker is handed (its slot and generation set as it starts)."""
        assert self.scoreboard is not None and self.admission is not None
        assert self.events is not None
        return WorkerSpec(
            config=config,
            slot=0,
            generation=0,
            listeners=tuple(self.listeners),
            scoreboard=self.scoreboard,
            admission=self.admission,
            events_fd=self.events[1],
            master_pid=os.getpid(),
            heartbeat_interval=heartbeat_interval,
            targets=targets.table,
            listener_targets=targets.by_listener,
        )

    def read_events(self) -> list[tuple[int, int]]:
        """(slot, event) of what the workers wrote to the event pipe since the last read."""
        assert self.events is not None
        try:
            data = os.read(self.events[0], 64 * EVENT_SIZE)
        except BlockingIOError:
            return []
        return list(struct.iter_unpack(EVENT_FORMAT, data))

    def close_own_listeners(self) -> None:
        """A stop begins. With --listen: the workers close their copies as they stop;
        once ours are closed too, new clients are refused at once instead of waiting in a
        backlog nobody accepts from. Sockets systemd passed stay open in systemd, whose
        backlog keeps such clients for the next start."""
        if self.owns_listeners:
            close_listeners(self.listeners + self.retiring)
            self.listeners, self.retiring = [], []

    def close_in_worker(self) -> None:
        """In a new worker: our copies of what only the master uses (never unlinking the
        master's socket files). Listeners a reload dropped must not stay open, and
        accepting into a queue, in a new worker."""
        assert self.events is not None
        os.close(self.events[0])
        for listener in (*self.metrics_listeners, *self.retiring):
            listener.sock.close()

    def records(self) -> tuple[tuple[SocketRecord, ...], tuple[SocketRecord, ...]]:
        """The listeners and the metrics sockets, for a reload's state."""
        return (
            tuple(_record(listener, self.addresses) for listener in self.listeners),
            tuple(_record(listener, self.metrics_addresses) for listener in self.metrics_listeners),
        )

    def close(self) -> None:
        """Release everything; safe after a failed start."""
        if self.events is not None:
            for fd in self.events:
                os.close(fd)
            self.events = None
        close_listeners(self.listeners + self.retiring)
        self.listeners, self.retiring = [], []
        close_listeners(self.metrics_listeners)
        self.metrics_listeners = []
        if self.scoreboard is not None:
            self.scoreboard.close()
        if self.mapping is not None:
            self.mapping.close()


def source_limit(config: Config) -> int:
    """The highest --connections-max-per-source of any listener (0: no limit anywhere).

    One table counts a source across listeners; each listener admits against its own
    limit (Admitter.admit), this one is the table's, for the metrics."""
    return max(
        [config.connections_max_per_source]
        + [settings.connections_max_per_source for settings in config.listeners]
    )


def shared_mapping(config: Config) -> SharedMapping:
    """The memfd mapping shared with every worker (shared/mapping.py)."""
    entries = source_entries(config.connections_max)
    try:
        return SharedMapping.create(entries)
    except OSError as error:
        size = mapping_bytes(entries) >> 20
        raise ForkproxyError(
            f"cannot create the shared memory ({size} MiB): {describe(error)}"
        ) from None


def describe(error: OSError) -> str:
    """An OSError of set-up as the end of a one-line message."""
    text = error.strerror or str(error)
    if error.errno in (errno.EMFILE, errno.ENFILE):
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        text += f" (the file descriptor limit is {limit}; raise LimitNOFILE= or ulimit -n)"
    return text


def _rebind(
    listeners: list[Listener],
    addresses: dict[int, str],
    wanted: tuple[ListenAddress, ...],
    socket_mode: int,
) -> tuple[list[Listener], dict[int, str], list[Listener], list[Listener]]:
    """The listeners for `wanted`: kept by address, else bound. Returns them, their
    addresses, those bound now and those no longer wanted."""
    by_key = {
        addresses[listener.fd]: listener for listener in listeners if listener.fd in addresses
    }
    result: list[Listener] = []
    keys: dict[int, str] = {}
    added: list[Listener] = []
    try:
        for address in wanted:
            key = address_key(address)
            kept = by_key.pop(key, None)
            if kept is None:
                listener = bind_listener(address, socket_mode)
                added.append(listener)
            else:
                listener = dataclasses.replace(kept, name=address.name)
            result.append(listener)
            keys[listener.fd] = key
    except ForkproxyError:
        close_listeners(added)
        raise
    return result, keys, added, list(by_key.values())


def _adopt(record: SocketRecord) -> Listener:
    try:
        sock = socket.socket(fileno=record.fd)
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    except OSError as error:
        raise ForkproxyError(
            f"inherited fd {record.fd} is not a socket: {error.strerror}"
        ) from None
    return Listener(sock, record.name, record.label, record.unlink_path, record.unlink_inode, kind)


def _record(listener: Listener, addresses: dict[int, str]) -> SocketRecord:
    return SocketRecord(
        listener.fd,
        listener.name,
        listener.label,
        listener.unlink_path,
        listener.unlink_inode,
        addresses.get(listener.fd),
    )
