"""A standalone harness for the compiled engine: a shared mapping, a loop thread, targets.

The mapping follows the layout proposed in csrc/README.md (a stand-in for the Python
side's shared/layout.py until it exists); the admission mutex is made the way the Python
side will make it, through ctypes. Tests only: never imported by forkproxy.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any


def load_engine() -> ModuleType | None:
    """forkproxy.relay._engine if it was built, else None."""
    try:
        from forkproxy.relay import _engine  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _engine


# -- the proposed layout (csrc/README.md) --------------------------------------------------

HEADER_BYTES = 4096
MAGIC = 0
VERSION = 8
MUTEX = 64
CAPACITY = 128
SLOT_HIGH_WATER = 136
CAPACITY_SEQ = 144
WAITERS = 148
SOURCE_LIMIT = 152
SOURCE_ENTRIES = 160
SOURCE_DIRTY = 168

MAX_SLOTS = 256
SLOT_BYTES = 512
SLOTS = HEADER_BYTES
KEY_SIZE = 16
SOURCE_COUNTS = KEY_SIZE
SOURCE_ROW_BYTES = KEY_SIZE + 2 * MAX_SLOTS
SOURCE_TABLE = SLOTS + MAX_SLOTS * SLOT_BYTES

# Slot words (today's scoreboard indexes, plus HELD)
WORD = 8
ACTIVE = 6
ACCEPTED = 7
REFUSED = 8
CONNECT_ERRORS = 9
BYTES_TO_TARGET = 10
BYTES_TO_CLIENT = 11
CLOSED = 12
LAST_ACTIVITY_NS = 5
CONNECT_DURATION_BUCKETS = 13
CONNECT_DURATION_BOUNDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
CONNECT_DURATION_SUM_NS = CONNECT_DURATION_BUCKETS + len(CONNECT_DURATION_BOUNDS) + 1
CONNECTION_DURATION_BUCKETS = CONNECT_DURATION_SUM_NS + 1
CONNECTION_DURATION_BOUNDS = (
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
)  # fmt: skip
CONNECTION_DURATION_SUM_NS = CONNECTION_DURATION_BUCKETS + len(CONNECTION_DURATION_BOUNDS) + 1
HELD = CONNECTION_DURATION_SUM_NS + 1

LAYOUT: dict[str, Any] = {
    "mutex": MUTEX,
    "capacity": CAPACITY,
    "slot_high_water": SLOT_HIGH_WATER,
    "capacity_seq": CAPACITY_SEQ,
    "waiters": WAITERS,
    "source_limit": SOURCE_LIMIT,
    "source_entries": SOURCE_ENTRIES,
    "source_dirty": SOURCE_DIRTY,
    "source_table": SOURCE_TABLE,
    "source_row_bytes": SOURCE_ROW_BYTES,
    "source_counts": SOURCE_COUNTS,
    "slots": SLOTS,
    "slot_bytes": SLOT_BYTES,
    "max_slots": MAX_SLOTS,
    "held": HELD * WORD,
    "active": ACTIVE * WORD,
    "accepted": ACCEPTED * WORD,
    "refused": REFUSED * WORD,
    "connect_errors": CONNECT_ERRORS * WORD,
    "bytes_to_target": BYTES_TO_TARGET * WORD,
    "bytes_to_client": BYTES_TO_CLIENT * WORD,
    "closed": CLOSED * WORD,
    "last_activity_ns": LAST_ACTIVITY_NS * WORD,
    "connect_duration_buckets": CONNECT_DURATION_BUCKETS * WORD,
    "connect_duration_sum_ns": CONNECT_DURATION_SUM_NS * WORD,
    "connection_duration_buckets": CONNECTION_DURATION_BUCKETS * WORD,
    "connection_duration_sum_ns": CONNECTION_DURATION_SUM_NS * WORD,
    "connect_duration_bounds": CONNECT_DURATION_BOUNDS,
    "connection_duration_bounds": CONNECTION_DURATION_BOUNDS,
}

_libc = ctypes.CDLL(None, use_errno=True)
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1


class SharedMapping:
    """The memfd mapping a master would make before forking (header, slots, table)."""

    def __init__(self, capacity: int, slots: int = 1, per_source: int = 0, entries: int = 0):
        size = SOURCE_TABLE + max(entries, 1) * SOURCE_ROW_BYTES
        fd = os.memfd_create("forkproxy-test", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        os.close(fd)
        self.words = memoryview(self.memory).cast("q")
        self.set_header(MAGIC, int.from_bytes(b"FPXSHM\0\0", "little"))
        self.set_header(VERSION, 2)
        self.set_header(CAPACITY, capacity)
        self.set_header(SLOT_HIGH_WATER, slots)
        self.set_header(SOURCE_LIMIT, per_source)
        self.set_header(SOURCE_ENTRIES, entries)
        self.mutex_address = self.address(MUTEX)
        attr = ctypes.create_string_buffer(64)
        for call, args in (
            (_libc.pthread_mutexattr_init, (attr,)),
            (_libc.pthread_mutexattr_setpshared, (attr, _PTHREAD_PROCESS_SHARED)),
            (_libc.pthread_mutexattr_setrobust, (attr, _PTHREAD_MUTEX_ROBUST)),
            (_libc.pthread_mutex_init, (ctypes.c_void_p(self.mutex_address), attr)),
        ):
            code = call(*args)
            if code:
                raise OSError(code, os.strerror(code))
        _libc.pthread_mutexattr_destroy(attr)

    def address(self, offset: int) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self.memory, offset))

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
