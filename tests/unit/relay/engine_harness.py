"""A standalone harness for the compiled engine: a shared mapping, a loop thread, targets.

The mapping is the one the master makes (shared/mapping.py, with the admission mutex of
shared/admission.py), and the engine gets its layout from shared/layout.py's
`engine_offsets()`, as a worker gives it. Tests only: never imported by forkproxy.
"""

from __future__ import annotations

import ctypes
import os
import queue
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from forkproxy.shared.admission import Admission
from forkproxy.shared.layout import (
    ACCEPTED,
    ACTIVE,
    BYTES_TO_CLIENT,
    BYTES_TO_TARGET,
    CAPACITY_SEQ,
    CLOSED,
    CONNECT_DURATION_BUCKETS,
    CONNECT_ERRORS,
    CONNECTION_DURATION_BUCKETS,
    CONNECTION_DURATION_SUM_NS,
    HELD,
    KEY_SIZE,
    MUTEX,
    REFUSED,
    SLOT_BYTES,
    SLOT_HIGH_WATER,
    SLOTS,
    SOURCE_COUNTS,
    SOURCE_DIRTY,
    SOURCE_ROW_BYTES,
    SOURCE_TABLE,
    WAITERS,
    WAITING,
    WORD,
    engine_offsets,
)
from forkproxy.shared.mapping import SharedMapping as _Mapping

__all__ = [
    "ACCEPTED",
    "ACTIVE",
    "BYTES_TO_CLIENT",
    "BYTES_TO_TARGET",
    "CAPACITY_SEQ",
    "CLOSED",
    "CONNECT_DURATION_BUCKETS",
    "CONNECT_ERRORS",
    "CONNECTION_DURATION_BUCKETS",
    "CONNECTION_DURATION_SUM_NS",
    "HELD",
    "MUTEX",
    "REFUSED",
    "SOURCE_DIRTY",
    "SOURCE_ROW_BYTES",
    "SOURCE_TABLE",
    "WAITERS",
    "WAITING",
]


def load_engine() -> ModuleType | None:
    """forkproxy.relay._engine if it was built, else None."""
    try:
        from forkproxy.relay import _engine
    except ImportError:
        return None
    return _engine


LAYOUT: dict[str, Any] = engine_offsets()

_libc = ctypes.CDLL(None, use_errno=True)


class SharedMapping:
    """The memfd mapping a master makes before forking (header, slots, table), with the
    cap, the per-source limit and slots [0, slots) prepared."""

    def __init__(self, capacity: int, slots: int = 1, per_source: int = 0, entries: int = 0):
        self.mapping = _Mapping.create(entries)
        self.admission = Admission.set_up(self.mapping, capacity, per_source)
        self.memory = self.mapping.memory
        self.words = self.mapping.words
        self.set_header(SLOT_HIGH_WATER, slots)
        self.mutex_address = self.mapping.base + MUTEX

    def address(self, offset: int) -> int:
        return self.mapping.base + offset

    def set_header(self, offset: int, value: int) -> None:
        self.words[offset // WORD] = value

    def header(self, offset: int) -> int:
        return int(self.words[offset // WORD])

    def header32(self, offset: int) -> int:
        return int(memoryview(self.memory)[offset : offset + 4].cast("I")[0])

    def slot_word(self, slot: int, word: int) -> int:
        return int(self.words[(SLOTS + slot * SLOT_BYTES) // WORD + word])

    def held_total(self) -> int:
        return sum(self.slot_word(slot, HELD) for slot in range(self.header(SLOT_HIGH_WATER)))

    def row_key(self, row: int) -> bytes:
        start = SOURCE_TABLE + row * SOURCE_ROW_BYTES
        return bytes(self.memory[start : start + KEY_SIZE])

    def row_counts(self, row: int, slots: int) -> list[int]:
        start = SOURCE_TABLE + row * SOURCE_ROW_BYTES + SOURCE_COUNTS
        return list(memoryview(self.memory)[start : start + 2 * slots].cast("H"))

    def lock(self) -> int:
        return int(_libc.pthread_mutex_lock(ctypes.c_void_p(self.mutex_address)))

    def trylock(self) -> int:
        return int(_libc.pthread_mutex_trylock(ctypes.c_void_p(self.mutex_address)))

    def unlock(self) -> int:
        return int(_libc.pthread_mutex_unlock(ctypes.c_void_p(self.mutex_address)))


@dataclass(frozen=True)
class Target:
    """What the engine reads of a target (settings' target address has these fields)."""

    text: str
    family: int
    host: str
    port: int
    sockaddr: Any


def tcp_target(port: int, host: str = "127.0.0.1") -> Target:
    return Target(f"{host}:{port}", socket.AF_INET, host, port, (host, port))


def name_target(host: str, port: int) -> Target:
    return Target(f"{host}:{port}", 0, host, port, None)


class Hooks:
    """Records what the engine reports; `resolver` answers hooks.resolve if set."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int, int, tuple[int, object]]] = []
        self.idle = 0
        self.drained = 0
        self.resolves: list[tuple[int, str, int]] = []
        self.resolver: Callable[[int, str, int], None] | None = None
        self.capacity_waits: list[int] = []

    def resolve(self, token: int, host: str, port: int) -> None:
        self.resolves.append((token, host, port))
        if self.resolver is not None:
            self.resolver(token, host, port)

    def on_event(self, code: int, count: int, error: int, detail: tuple[int, object]) -> None:
        self.events.append((code, count, error, detail))

    def on_idle(self) -> None:
        self.idle += 1

    def on_drained(self) -> None:
        self.drained += 1

    def on_capacity_wait(self, seq: int) -> None:
        self.capacity_waits.append(seq)


class EngineRunner:
    """Runs an engine's loop on a thread: select on engine.fileno(), then dispatch()."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.errors: list[BaseException] = []
        self._calls: queue.Queue[tuple[Callable[[], object], queue.Queue[object]]] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self.engine.fileno()
        while not self._stopping:
            ready, _, _ = select.select([fd, self._wake_r], [], [], 5.0)
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                while not self._calls.empty():
                    call, answer = self._calls.get()
                    try:
                        answer.put(call())
                    except BaseException as error:  # handed to the caller
                        answer.put(error)
            if fd in ready:
                try:
                    self.engine.dispatch()
                except Exception as error:  # a hook raised: recorded for the test
                    self.errors.append(error)

    def call(self, call: Callable[[], object]) -> Any:
        """Run `call` on the loop thread and return its result (or raise its error)."""
        answer: queue.Queue[object] = queue.Queue()
        self._calls.put((call, answer))
        os.write(self._wake_w, b"x")
        result = answer.get(timeout=30)
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=30)
        os.close(self._wake_r)
        os.close(self._wake_w)


def listener(host: str = "127.0.0.1", backlog: int = 128) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
