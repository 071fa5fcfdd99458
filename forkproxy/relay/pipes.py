"""The kernel pipes a relay splices through: `Pipe`, and `PipePool`, a worker's spare ones.

A direction of a relay borrows a pipe only while it holds bytes in flight (splice.py);
the pool keeps a few empty ones for the next connection and closes the rest. Never
splices, and never lends a pipe that still holds bytes.
"""

import fcntl
import os

from forkproxy.errors import ForkproxyError
from forkproxy.settings.options import format_size


class Pipe:
    """A kernel pipe used as a splice buffer; owned by the pool or by one direction."""

    __slots__ = ("read_fd", "write_fd", "capacity")

    def __init__(self, read_fd: int, write_fd: int, capacity: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.capacity = capacity

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class PipePool:
    """A worker's empty pipes, created lazily and reused across connections.

    Only empty pipes come back (`release`); a pipe that still holds bytes when its
    connection dies is closed (`discard`), so no byte can leak into another connection.
    """

    __slots__ = ("_free", "_size", "_keep")

    def __init__(self, size: int, keep: int) -> None:
        self._free: list[Pipe] = []
        self._size = size
        self._keep = keep

    def acquire(self) -> Pipe:
        if self._free:
            return self._free.pop()
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._size:
            try:
                fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, self._size)
            except OSError:
                pass  # over /proc/sys/fs/pipe-user-pages-soft: keep the default size
        return Pipe(read_fd, write_fd, fcntl.fcntl(read_fd, fcntl.F_GETPIPE_SZ))

    def release(self, pipe: Pipe) -> None:
        # A pipe the kernel made smaller (the per-user pipe limit was reached) is not
        # kept: the next one may get the full size once the user's pipes are fewer.
        if len(self._free) < self._keep and pipe.capacity >= self._size:
            self._free.append(pipe)
        else:
            pipe.close()

    def close(self) -> None:
        while self._free:
            self._free.pop().close()


def check_pipe_size(size: int) -> None:
    """ForkproxyError if this process cannot make pipes of `size` bytes (--pipe-size)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, size)
    except OSError as error:
        raise ForkproxyError(
            f"cannot make pipes of --pipe-size={format_size(size)}: {error.strerror} (without "
            "CAP_SYS_RESOURCE the most is /proc/sys/fs/pipe-max-size)"
        ) from None
    finally:
        os.close(read_fd)
        os.close(write_fd)
