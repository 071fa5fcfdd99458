"""Host names resolved for the active checks without blocking the master.

getaddrinfo(3) blocks, and the master has no thread to run it on (threads and fork do
not mix: every worker is forked from the master). A `Resolution` runs it in a child
process instead, spawned with posix_spawn(2) so nothing of the master is copied: a fresh
`python -I -S` that resolves one name with the system's resolver (nsswitch, as the
workers' resolver does) and writes the answer as JSON to a pipe, which the master's
selector reads. Its result goes to `on_done` exactly once; past the caller's deadline
`cancel` kills it (through a pidfd, so never another process that got its pid). The
master's SIGCHLD handling reaps it as any child that is no worker. One spawn costs some
milliseconds of CPU: health.py keeps an answer for RESOLVE_INTERVAL. Never logs.
"""

import errno
import json
import os
import selectors
import signal
import socket
import sys
from collections.abc import Callable

from forkproxy.supervisor.probe import Address

RESOLVE_INTERVAL = 30.0  # seconds an answer is used for the checks before asking again
MAX_ANSWER = 1 << 16  # bytes of JSON at most: far more than any getaddrinfo answer

# The child: argv host, port, socket type; stdout one JSON line.
_CHILD = """\
import json, socket, sys
host, port, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    found = socket.getaddrinfo(host, port, type=kind)
except (OSError, UnicodeError) as error:
    answer = {"error": getattr(error, "strerror", None) or str(error)}
else:
    answer = {"addresses": [[family, list(sockaddr)] for family, _, _, _, sockaddr in found]}
sys.stdout.write(json.dumps(answer))
"""

OnResolved = Callable[[list[Address] | None, str], None]  # (addresses, or None and why)


class Resolution:
    """getaddrinfo(host, port) in a child process; the answer to `on_done`."""

    def __init__(
        self, selector: selectors.BaseSelector, host: str, port: int, kind: int, on_done: OnResolved
    ) -> None:
        self.selector = selector
        self.on_done: OnResolved | None = on_done
        self.answer = bytearray()
        self.read_fd = -1
        self.pidfd = -1
        self.pid = 0
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            argv = [sys.executable, "-I", "-S", "-c", _CHILD, host, str(port), str(kind)]
            pid = os.posix_spawn(
                sys.executable,
                argv,
                os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, write_fd, 1)],
                setsigmask=(),
                setsigdef=(signal.SIGPIPE, signal.SIGINT, signal.SIGTERM),
            )
            self.pid = pid  # reaped by the master's SIGCHLD handling, as any child
            # Before the loop can reap it: the pidfd is this child's for good.
            self.pidfd = os.pidfd_open(pid)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.read_fd = read_fd
        selector.register(read_fd, selectors.EVENT_READ, self._on_event)

    def _on_event(self) -> None:
        try:
            self._on_readable()
        except Exception as error:  # a bug: the check fails, the master goes on
            self._finish(None, f"internal error: {error!r}")

    def _on_readable(self) -> None:
        try:
            data = os.read(self.read_fd, MAX_ANSWER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._finish(None, error.strerror or str(error))
            return
        self.answer += data
        if data and len(self.answer) < MAX_ANSWER:
            return
        self._finish(*_parse(bytes(self.answer)))

    def cancel(self) -> None:
        """Kill the child if it still runs; no answer comes."""
        self.on_done = None
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # exited already
        self._close()

    def close(self) -> None:
        """In a new worker: drop the master's copies of the pipe and the pidfd."""
        self.on_done = None
        self._close()

    def _finish(self, addresses: list[Address] | None, why: str) -> None:
        self._close()
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(addresses, why)

    def _close(self) -> None:
        if self.read_fd >= 0:
            try:
                self.selector.unregister(self.read_fd)
            except (KeyError, ValueError):
                pass
            os.close(self.read_fd)
            self.read_fd = -1
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _parse(answer: bytes) -> tuple[list[Address] | None, str]:
    try:
        parsed = json.loads(answer)
    except ValueError:
        return None, "the resolver process gave no answer"
    if not isinstance(parsed, dict):
        return None, "the resolver process gave no answer"
    if "error" in parsed:
        return None, str(parsed["error"])
    addresses: list[Address] = []
    for family, sockaddr in parsed.get("addresses", []):
        if family == socket.AF_INET6:
            addresses.append((family, (sockaddr[0], sockaddr[1], sockaddr[2], sockaddr[3])))
        elif family == socket.AF_INET:
            addresses.append((family, (sockaddr[0], sockaddr[1])))
    if not addresses:
        return None, os.strerror(errno.EADDRNOTAVAIL)
    return addresses, ""
