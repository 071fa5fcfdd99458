"""Which target a connection goes to: round-robin and cool-down over a group of targets.

Each listener's route (plans.py) has a `TargetGroup`: the targets its settings give
(`[listeners.NAME]` targets, `--route NAME=TARGET`), else the global ones. A group of
one target connects to it directly (nothing extra per connection). A group of several
spreads connections round-robin over the healthy ones; a target that fails to connect
is skipped for `COOLDOWN` seconds and the connection tries the next, so a client fails
only when every target has. The state is per worker: each learns of a failure by
meeting it, which needs no shared memory. Never logs; the worker passes
`on_target_failed` to report failures.
"""

import errno
import math
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from forkproxy.relay.poller import Readiness
from forkproxy.relay.target_connect import SocketOptions, TargetConnect
from forkproxy.settings.address import TargetAddress

if TYPE_CHECKING:
    import asyncio

COOLDOWN = 5.0  # seconds a target that failed to connect is tried only if all others fail
# Failures of this machine, not of a target: no cool-down, and no other target is tried.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

OnFailed = Callable[[OSError], None]
OnTargetFailed = Callable[[TargetAddress, OSError, bool], None]


class OnConnected(Protocol):
    """Connected: the socket, and the index of its target in the group (-1 when a group
    of one connected it directly)."""

    def __call__(self, sock: socket.socket, index: int = -1, /) -> None: ...


class Group(Protocol):
    """What a `FailoverConnect` tries: a `TargetGroup`, or a `Balancer` (balance.py)."""

    @property
    def targets(self) -> tuple[TargetAddress, ...]: ...
    @property
    def timeout(self) -> float: ...
    @property
    def options(self) -> SocketOptions: ...
    def failed(self, index: int, error: OSError) -> None: ...
    def succeeded(self, index: int) -> None: ...


class TargetGroup:
    """The targets of one route, with this worker's view of which are healthy."""

    __slots__ = (
        "targets",
        "label",
        "timeout",
        "options",
        "on_target_failed",
        "_next",
        "_cooling_until",
        "_clock",
    )

    def __init__(
        self,
        targets: Sequence[TargetAddress],
        timeout: float = math.inf,
        options: SocketOptions = (),
        on_target_failed: OnTargetFailed | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.targets = tuple(targets)
        self.label = " or ".join(f"'{target.text}'" for target in self.targets)
        self.timeout = timeout
        self.options = options
        self.on_target_failed = on_target_failed
        self._next = 0
        self._cooling_until = [0.0] * len(self.targets)  # by index into targets
        self._clock = clock

    def connect(
        self,
        loop: "asyncio.AbstractEventLoop",
        io: Readiness,
        on_connected: OnConnected,
        on_failed: OnFailed,
        family: int = 0,
        peer: object = None,
    ) -> "TargetConnect | FailoverConnect":
        """Start connecting one client; exactly one of the callbacks will run. (`family`
        and `peer`, the client's address, are for a `Balancer`'s --balance source.)"""
        if len(self.targets) == 1:
            attempt: TargetConnect | FailoverConnect = TargetConnect(
                loop, io, self.targets[0], on_connected, on_failed, self.timeout, self.options
            )
        else:
            attempt = FailoverConnect(self, loop, io, on_connected, on_failed)
            attempt.order = self.order()
        attempt.start()
        return attempt

    def order(self) -> list[int]:
        """Target indexes to try: healthy ones round-robin, then cooling ones, soonest
        back first (a client fails only when every target has failed it)."""
        count = len(self.targets)
        start = self._next
        self._next = (start + 1) % count
        now = self._clock()
        rotation = [(start + step) % count for step in range(count)]
        healthy = [index for index in rotation if self._cooling_until[index] <= now]
        cooling = sorted(
            (index for index in rotation if self._cooling_until[index] > now),
            key=self._cooling_until.__getitem__,
        )
        return healthy + cooling

    def failed(self, index: int, error: OSError) -> None:
        """Target `index` could not be connected to: cool it down."""
        newly = self._cooling_until[index] <= self._clock()
        self._cooling_until[index] = self._clock() + COOLDOWN
        if self.on_target_failed is not None:
            self.on_target_failed(self.targets[index], error, newly)

    def succeeded(self, index: int) -> None:
        self._cooling_until[index] = 0.0


class FailoverConnect:
    """One client's connection: each target of a group in `order` (the group's indexes,
    set before `start`) until one connects."""

    __slots__ = ("group", "loop", "io", "on_connected", "on_failed", "order", "step", "current")

    def __init__(
        self,
        group: Group,
        loop: "asyncio.AbstractEventLoop",
        io: Readiness,
        on_connected: OnConnected,
        on_failed: OnFailed,
    ) -> None:
        self.group = group
        self.loop = loop
        self.io = io
        self.on_connected = on_connected
        self.on_failed = on_failed
        self.order: list[int] = []
        self.step = 0
        self.current: TargetConnect | None = None

    def start(self) -> None:
        self._try_next(None)

    def _exhausted(self, error: OSError | None) -> None:
        """Every target in `order` failed (`error`: the last one's)."""
        assert error is not None
        self.on_failed(error)

    def _try_next(self, error: OSError | None) -> None:
        if self.step >= len(self.order):
            self.current = None
            self._exhausted(error)
            return
        index = self.order[self.step]
        self.step += 1
        group = self.group
        self.current = TargetConnect(
            self.loop,
            self.io,
            group.targets[index],
            self._on_connected,
            self._on_target_failed,
            group.timeout,
            group.options,
        )
        self.current.start()

    def _on_connected(self, sock: socket.socket) -> None:
        self.current = None
        index = self.order[self.step - 1]
        self.group.succeeded(index)
        self.on_connected(sock, index)

    def _on_target_failed(self, error: OSError) -> None:
        if error.errno in LOCAL_ERRNOS:
            self.current = None
            self.on_failed(error)
            return
        self.group.failed(self.order[self.step - 1], error)
        self._try_next(error)

    def fileno(self) -> int:
        current = self.current
        return -1 if current is None else current.fileno()

    def expire(self, now: float) -> bool:
        current = self.current
        return current is not None and current.expire(now)

    def cancel(self) -> None:
        current = self.current
        if current is not None:
            self.current = None
            current.cancel()
