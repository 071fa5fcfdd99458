"""The soak's clients: one connection of each scenario, every byte it gets checked.

A connection sends its request at once, reading while it sends; the first byte back must
be the backend's greeting (b"+": admitted and relayed), the rest what the scenario asks
for: the exact bytes (echo, download) or a SHA-256 line (small, churn, upload). The
outcome is "ok", "no-greeting" (refused at the cap, or cut before the greeting), "failed"
(cut short: EOF, reset, no progress) or "corrupt" (a byte that differs). Never judges a
run: `bench.soak` attributes the failures.
"""

from __future__ import annotations

import hashlib
import random
import selectors
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bench.soak_backend import BLOCK, stream

CONNECTION_TIMEOUT = 60.0  # a connection that makes no progress for this long has failed
SCENARIOS = {  # name: weight
    "small": 40,  # request and reply of a few KiB, the backend closes
    "churn": 25,  # connect, a few bytes, reply, gone
    "echo": 12,  # up to 1 MiB back and forth, ended by the client's half-close
    "upload": 10,  # up to 8 MiB up, its digest back
    "download": 13,  # up to 16 MiB down, every block checked
}


@dataclass(slots=True)
class Record:
    scenario: str
    started: float
    ended: float = 0.0
    port: int = 0
    outcome: str = ""  # ok, no-greeting, failed, corrupt
    detail: str = ""
    sent: int = 0
    received: int = 0


class Corrupt(Exception):
    """Bytes arrived that differ from what had to arrive."""


class Cut(Exception):
    """The connection ended (EOF, reset, timeout) before all that had to arrive did."""


# -- one connection ----------------------------------------------------------------------


def exchange(
    sock: socket.socket,
    outgoing: Iterator[bytes],
    half_close: bool,
    record: Record,
    check: Checker,
) -> None:
    """Send everything while reading everything, until the proxy ends the connection."""
    sock.setblocking(False)
    with selectors.DefaultSelector() as selector:
        pending = memoryview(b"")
        sending = True
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while True:
            events = selector.select(CONNECTION_TIMEOUT)
            if not events:
                raise Cut(f"no progress for {CONNECTION_TIMEOUT:g}s")
            for _, mask in events:
                if mask & selectors.EVENT_WRITE and sending:
                    if not pending:
                        chunk = next(outgoing, None)
                        if chunk is None:
                            sending = False
                            if half_close:
                                try:
                                    sock.shutdown(socket.SHUT_WR)
                                except OSError as error:
                                    raise check.cut(f"shutdown: {error}") from None
                            selector.modify(sock, selectors.EVENT_READ)
                            continue
                        pending = memoryview(chunk)
                    try:
                        sent = sock.send(pending)
                    except BlockingIOError:
                        continue
                    except OSError as error:
                        raise check.cut(f"send: {error}") from None
                    pending = pending[sent:]
                    record.sent += sent
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    except OSError as error:
                        raise check.cut(f"recv: {error}") from None
                    if not data:
                        check.end()
                        return
                    record.received += len(data)
                    check.feed(data)


class Checker:
    """The greeting, then what the scenario expects; raises Corrupt or Cut."""

    def __init__(self) -> None:
        self.greeted = False

    def feed(self, data: bytes) -> None:
        if not self.greeted:
            if data[:1] != b"+":
                raise Corrupt(f"greeting {data[:1]!r}")
            self.greeted = True
            data = data[1:]
        if data:
            self.body(data)

    def end(self) -> None:
        if not self.greeted:
            raise NoGreeting("EOF")
        self.finish()

    def cut(self, why: str) -> Cut:
        """The error for a connection that ended with `why` (a reset before the greeting
        is a refusal: forkproxy closed it with our request unread)."""
        return Cut(why) if self.greeted else NoGreeting(why)

    def body(self, data: bytes) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class NoGreeting(Cut):
    """Closed before the backend's greeting: refused at the cap, or cut by a kill."""


class Expect(Checker):
    """Exactly these bytes, in order (echo, download)."""

    def __init__(self, expected: Iterator[bytes], size: int) -> None:
        super().__init__()
        self.expected = expected
        self.size = size
        self.offset = 0
        self.window = memoryview(b"")

    def body(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self.window:
                block = next(self.expected, None)
                if block is None:
                    raise Corrupt(f"{len(view)} bytes more than the {self.size} expected")
                self.window = memoryview(block)
            n = min(len(view), len(self.window))
            if view[:n] != self.window[:n]:
                raise Corrupt(f"wrong bytes at offset {self.offset}")
            view, self.window, self.offset = view[n:], self.window[n:], self.offset + n

    def finish(self) -> None:
        if self.offset != self.size:
            raise Cut(f"{self.offset} of {self.size} bytes before the end")


class Digest(Checker):
    """One reply line: the SHA-256 and length of what was sent (small, churn, upload)."""

    def __init__(self, expected: str) -> None:
        super().__init__()
        self.expected = expected
        self.reply = b""

    def body(self, data: bytes) -> None:
        self.reply += data
        if len(self.reply) > len(self.expected) + 1:
            raise Corrupt(f"reply too long: {self.reply[:100]!r}")

    def finish(self) -> None:
        if not self.reply.endswith(b"\n"):
            raise Cut(f"reply cut short: {self.reply!r}")
        if self.reply.decode(errors="replace").strip() != self.expected:
            raise Corrupt(f"reply {self.reply!r}, expected {self.expected!r}")


def _chunks(data: bytes, size: int = BLOCK) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def plan(scenario: str, rng: random.Random) -> tuple[Iterator[bytes], bool, Checker]:
    """What one connection sends, whether it half-closes, and how its replies are checked."""
    if scenario in ("small", "churn"):
        payload = rng.randbytes(rng.randint(0, 4096 if scenario == "small" else 32))
        head = f"small {len(payload)}\n".encode()
        digest = f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"
        return iter([head + payload]), False, Digest(digest)
    if scenario == "echo":
        payload = rng.randbytes(rng.randint(1, 1 << 20))
        return iter([b"echo\n", *_chunks(payload)]), True, Expect(_chunks(payload), len(payload))
    if scenario == "upload":
        size, seed = rng.randint(1, 8 << 20), rng.getrandbits(63)
        upload = iter([b"digest\n", *stream(seed, size)])
        return upload, True, Digest(f"{_digest_of(seed, size)} {size}")
    size, seed = rng.randint(1, 16 << 20), rng.getrandbits(63)
    head = f"source {size} {seed}\n".encode()
    return iter([head]), False, Expect(stream(seed, size), size)


def _digest_of(seed: int, size: int) -> str:
    hasher = hashlib.sha256()
    for block in stream(seed, size):
        hasher.update(block)
    return hasher.hexdigest()


def one_connection(address: tuple[str, int], scenario: str, rng: random.Random) -> Record:
    outgoing, half_close, check = plan(scenario, rng)
    record = Record(scenario, time.monotonic())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECTION_TIMEOUT)
        sock.connect(address)
        record.port = sock.getsockname()[1]
        exchange(sock, outgoing, half_close, record, check)
        record.outcome = "ok"
    except NoGreeting as error:
        record.outcome, record.detail = "no-greeting", str(error)
    except Corrupt as error:
        record.outcome, record.detail = "corrupt", str(error)
    except (Cut, OSError) as error:
        record.outcome, record.detail = "failed", str(error) or type(error).__name__
    finally:
        sock.close()
        record.ended = time.monotonic()
    return record
