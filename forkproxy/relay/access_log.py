"""A worker's access log: one line per connection when it ends, each with one write(2).

`AccessLogFiles` holds the files a worker writes (one per --access-log path, opened by
the worker itself O_APPEND|O_CLOEXEC, so every line lands whole at the end whichever
process writes it) and reopens them on SIGUSR1 (`reopen`). A write never waits: a line
the file cannot take at once (ENOSPC, EIO, EAGAIN on standard error's pipe or socket) is
dropped and counted in the slot's ACCESS_LOG_DROPPED. `ListenerLog` writes one
listener's lines; a connection's `Trail` collects, while it lasts, what its line says
(the fields of an `AccessRecord`).
Listeners without --access-log have no `ListenerLog`, and their connections no `Trail`:
nothing is done for them. Formats nothing itself (access_log_format.py); never logs a
connection anywhere else.
"""

import errno
import logging
import os
import socket
import stat
import time

from forkproxy.errors import ForkproxyError
from forkproxy.relay.access_log_format import (
    END_CLIENT_CLOSED,
    END_CLIENT_RESET,
    END_CONNECT_FAILED,
    END_CONNECT_TIMEOUT,
    END_IDLE_TIMEOUT,
    END_NO_TARGET,
    END_STOPPED,
    END_TARGET_CLOSED,
    END_TARGET_RESET,
    line_formatter,
)
from forkproxy.relay.splice import Relay
from forkproxy.relay.target_connect import NoAddress
from forkproxy.relay.timeouts import GRACEFUL_ERROR, IDLE_ERROR
from forkproxy.settings.address import format_sockaddr
from forkproxy.settings.config import Config
from forkproxy.settings.quoting import quote
from forkproxy.shared.layout import ACCESS_LOG_DROPPED

log = logging.getLogger("forkproxy")

STDERR = "-"
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_FILE_MODE = 0o640  # and the umask


def access_log_paths(config: Config) -> list[str]:
    """Every --access-log file of these settings, global or per listener (not "-")."""
    paths = {config.access_log, *(settings.access_log for settings in config.listeners)}
    return sorted(path for path in paths if path and path != STDERR)


def check_access_logs(config: Config) -> None:
    """Open (creating it) and close each access-log file, as the workers will: a missing
    directory or a file we may not write is an error now, not in every worker."""
    for path in access_log_paths(config):
        try:
            os.close(os.open(path, _OPEN_FLAGS | os.O_NONBLOCK, _FILE_MODE))
        except OSError as error:
            raise ForkproxyError(
                f"cannot open access log {quote(path)}: {error.strerror or error}"
            ) from None


def access_log_problems(config: Config) -> list[str]:
    """What `check_access_logs` would find, without creating or opening a file (--check)."""
    problems = []
    for path in access_log_paths(config):
        if os.path.isdir(path):
            code = errno.EISDIR
        elif os.path.exists(path):
            code = 0 if os.access(path, os.W_OK) else errno.EACCES
        else:
            parent = os.path.dirname(path) or "."
            code = errno.ENOENT if not os.path.isdir(parent) else 0
            if not code and not os.access(parent, os.W_OK):
                code = errno.EACCES
        if code:
            problems.append(f"cannot open access log {quote(path)}: {os.strerror(code)}")
    return problems


class _Sink:
    """One access-log file, or standard error."""

    __slots__ = ("path", "fd", "sock")

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1  # ours to close
        self.sock: socket.socket | None = None  # standard error when it is a socket
        self.open()

    def open(self) -> None:
        """Open the path (again); the old file stays if that fails (OSError)."""
        if self.path != STDERR:
            fd = os.open(self.path, _OPEN_FLAGS | os.O_NONBLOCK, _FILE_MODE)
        elif stat.S_ISSOCK(os.fstat(2).st_mode):
            # The journal's stream: send(2) with MSG_DONTWAIT, so a full socket drops a
            # line instead of stopping the worker, without changing fd 2's own flags.
            if self.sock is None:
                self.sock = socket.socket(fileno=os.dup(2))
            return
        else:
            # A new open file description of the same pipe or terminal, non-blocking
            # without making the master's fd 2 so.
            fd = os.open(
                "/proc/self/fd/2", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK
            )
        if self.fd < 0:
            self.fd = fd
            return
        # In place of the old file, at the same number: the compiled engine writes to it.
        try:
            os.dup2(fd, self.fd, inheritable=False)
        finally:
            os.close(fd)

    def write(self, line: bytes) -> bool:
        """The line with one write(2); False if it was not written whole."""
        try:
            sock = self.sock
            if sock is not None:
                return sock.send(line, socket.MSG_DONTWAIT) == len(line)
            return os.write(self.fd, line) == len(line)
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class AccessLogFiles:
    """The access-log files of one worker, by path; each opened once however many
    listeners write to it."""

    def __init__(self, slot: memoryview) -> None:
        self.slot = slot
        self.sinks: dict[str, _Sink] = {}

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def listener_log(
        self, path: str, format_name: str, listener: str, worker: int, fixed_target: str = ""
    ) -> "ListenerLog":
        sink = self.sinks.get(path)
        if sink is None:
            sink = self.sinks[path] = _Sink(path)
        return ListenerLog(sink, format_name, listener, worker, self.slot, fixed_target)

    def descriptor(self, path: str) -> int:
        """The descriptor the compiled engine writes `path`'s lines to (opening it first:
        a file, standard error, or the journal's stream socket). It keeps its number when
        `reopen` opens the file again."""
        sink = self.sinks.get(path)
        if sink is None:
            sink = self.sinks[path] = _Sink(path)
        return sink.sock.fileno() if sink.sock is not None else sink.fd

    def reopen(self) -> None:
        """SIGUSR1: reopen every file at its path (after logrotate renamed it)."""
        for sink in self.sinks.values():
            if sink.path == STDERR:
                continue
            try:
                sink.open()
            except OSError as error:
                log.error(
                    "cannot reopen access log %s: %s, writing to the old file",
                    quote(sink.path),
                    error.strerror or error,
                )

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.close()


class Trail:
    """One connection's access-log record in the making: made at accept, written once
    when the connection ends (`end`). Its fields are an `AccessRecord`'s, which the
    formatter reads from it directly."""

    __slots__ = (
        "log",
        "started_ns",
        "end_ns",
        "listener",
        "client",
        "target",
        "worker",
        "connect_ns",
        "duration_ns",
        "bytes_from_client",
        "bytes_to_client",
        "end",
    )

    def __init__(self, log: "ListenerLog", client: str) -> None:
        self.log = log
        self.started_ns = time.monotonic_ns()
        self.end_ns = 0  # CLOCK_REALTIME at the end
        self.listener = log.listener
        self.client = client  # address:port, the PROXY-carried one when there is one
        self.target = ""
        self.worker = log.worker
        self.connect_ns = -1  # -1: no connect was made
        self.duration_ns = 0
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.end = ""

    def connected(self, target: socket.socket, text: str = "") -> None:
        """Connected to `target` (`text`: the target as written, when the caller knows
        which one it is: the balancer's choice, as its counters name it)."""
        self.connect_ns = time.monotonic_ns() - self.started_ns
        fixed = text or self.log.fixed_target
        if fixed:
            self.target = fixed
            return
        try:
            self.target = format_sockaddr(target.family, target.getpeername())
        except OSError:
            self.target = ""

    def finish(self, end: str, bytes_from_client: int = 0, bytes_to_client: int = 0) -> None:
        """The connection ended (`end`, one of access_log_format.END_REASONS): its line."""
        self.end_ns = time.time_ns()
        self.duration_ns = time.monotonic_ns() - self.started_ns
        self.bytes_from_client = bytes_from_client
        self.bytes_to_client = bytes_to_client
        self.end = end
        self.log.write(self)

    def relay_ended(self, relay: Relay) -> None:
        """The relay's line: its end, and the bytes each way its directions delivered."""
        self.finish(
            relay_end(relay),
            relay.client_to_target.moved,
            relay.target_to_client.moved,
        )


class ListenerLog:
    """Writes the lines of one listener's connections to its access log."""

    __slots__ = ("sink", "format", "listener", "worker", "slot", "fixed_target")

    def __init__(
        self,
        sink: _Sink,
        format_name: str,
        listener: str,
        worker: int,
        slot: memoryview,
        fixed_target: str = "",
    ) -> None:
        self.sink = sink
        # The listener's one target when it is an address (no name to resolve): every
        # connection's, so its text needs no getpeername(2).
        self.fixed_target = fixed_target
        self.format = line_formatter(format_name)
        self.listener = listener
        self.worker = worker
        self.slot = slot  # ACCESS_LOG_DROPPED: ours to count

    def trail(self, family: int, peer: object) -> Trail:
        return Trail(self, format_sockaddr(family, peer))

    def refused(self, family: int, peer: object, end: str) -> None:
        """A client closed at accept: no connect, no bytes."""
        Trail(self, format_sockaddr(family, peer)).finish(end)

    def write(self, trail: Trail) -> None:
        if not self.sink.write(self.format(trail)):
            self.slot[ACCESS_LOG_DROPPED] += 1


def relay_end(relay: Relay) -> str:
    """Why a relay ended, as the access log says it."""
    error = relay.error
    from_client = relay.ended_by == relay.client_to_target.src_fd
    if error is None:
        return END_CLIENT_CLOSED if from_client else END_TARGET_CLOSED
    if error is IDLE_ERROR:
        return END_IDLE_TIMEOUT
    if error is GRACEFUL_ERROR:
        return END_STOPPED
    # From the target's socket, or forkproxy's own abort (no pipe, an internal error).
    return END_CLIENT_RESET if from_client else END_TARGET_RESET


def connect_end(error: OSError) -> str:
    """Why a client's connect to its targets failed, as the access log says it."""
    if isinstance(error, NoAddress):
        return END_NO_TARGET
    if error.errno == errno.ETIMEDOUT:
        return END_CONNECT_TIMEOUT
    return END_CONNECT_FAILED
