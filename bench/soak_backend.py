"""The soak's backend: one epoll thread that serves the soak's requests and counts.

Every connection is greeted with b"+" (so a client knows it was admitted and reached the
backend) and then opens with one line naming what it wants:

  small N       N bytes follow; reply "SHA256HEX N\\n" and close
  echo          every byte back; on EOF, shut down writing and close (half-close)
  digest        read to EOF; reply "SHA256HEX N\\n" and close (bulk upload)
  source N SEED N bytes of `stream(SEED)`, then close (bulk download)

In every mode the backend ends the connection first, and it counts a connection as ended
at its own close(), before forkproxy can see that end and release the connection's unit
of capacity. It handles every ready connection before accepting (and reads each to
EAGAIN, so an EOF that has arrived is seen). So `current` never exceeds the number of
connections forkproxy holds admitted, and `peak` is the backend's view of the cap.
A SIGKILLed worker's connections are the exception: forkproxy learns of their end (the
master reaps the worker and returns its capacity) without the backend having read it
first, so the soak declares them ended (`mark_dead`) before the kill. Never signals a
process; never asserts.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import select
import socket
import struct
import threading
from collections import deque
from collections.abc import Iterable, Iterator

BLOCK = 64 << 10
READ_SIZE = 256 << 10
OUT_HIGH_WATER = 4 << 20  # echo: stop reading while this much waits to be sent back


def stream(seed: int, size: int) -> Iterator[bytes]:
    """The bytes of a download: BLOCK-sized, each opening with its index (no two blocks of
    any stream alike, so a lost, doubled or misplaced block cannot match)."""
    base = random.Random(seed).randbytes(BLOCK)
    for index in range(0, -(-size // BLOCK)):
        block = struct.pack(">QQ", seed, index) + base[16:]
        yield block[: min(BLOCK, size - index * BLOCK)]


class _Conn:
    __slots__ = (
        "sock",
        "peer_port",
        "counted",
        "header",
        "mode",
        "expected",
        "received",
        "hasher",
        "out",
        "out_bytes",
        "source",
        "eof",
        "closing",
        "events",
    )

    def __init__(self, sock: socket.socket, peer_port: int, counted: bool) -> None:
        self.sock = sock
        self.peer_port = peer_port
        self.counted = counted  # in `current` now
        self.header = b""
        self.mode = ""
        self.expected = 0
        self.received = 0
        self.hasher = hashlib.sha256()
        self.out: deque[memoryview] = deque([memoryview(b"+")])
        self.out_bytes = 1
        self.source: Iterator[bytes] | None = None
        self.eof = False
        self.closing = False  # close once `out` is sent
        self.events = 0


class SoakBackend:
    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.listener.setblocking(False)
        self.port = int(self.listener.getsockname()[1])
        self.target = f"127.0.0.1:{self.port}"
        self.poll = select.epoll()
        self.poll.register(self.listener.fileno(), select.EPOLLIN)
        self.conns: dict[int, _Conn] = {}
        self.lock = threading.Lock()  # current, peak, dead, and `counted` of every conn
        self.current = 0
        self.peak = 0
        self.total = 0
        self.excused = 0  # connections declared ended by mark_dead
        self.dead: set[int] = set()  # peer ports of killed workers' connections not yet seen
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-backend", daemon=True)
        self.thread.start()

    # -- counting ------------------------------------------------------------------------

    def mark_dead(self, peer_ports: Iterable[int]) -> None:
        """These connections (by the proxy's local port) belong to a worker about to be
        SIGKILLed: they end now, as their capacity may come back before we read their end."""
        ports = set(peer_ports)
        with self.lock:
            self.dead = set(ports)  # older leftovers were never accepted: forget them
            for conn in self.conns.values():
                if conn.peer_port in ports:
                    self.dead.discard(conn.peer_port)
                    if conn.counted:
                        conn.counted = False
                        self.current -= 1
                        self.excused += 1

    def _count_in(self, conn: _Conn) -> None:
        with self.lock:
            self.total += 1
            if conn.peer_port in self.dead:
                self.dead.discard(conn.peer_port)
                self.excused += 1
                return
            conn.counted = True
            self.current += 1
            self.peak = max(self.peak, self.current)

    def _count_out(self, conn: _Conn) -> None:
        with self.lock:
            if conn.counted:
                conn.counted = False
                self.current -= 1

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        listener_fd = self.listener.fileno()
        while not self.stopping.is_set():
            events = self.poll.poll(0.2)
            ready_listener = False
            for fd, mask in events:  # every connection first, then new ones
                if fd == listener_fd:
                    ready_listener = True
                elif fd in self.conns:
                    self._on_event(self.conns[fd], mask)
            if ready_listener:
                self._accept()

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and the like: the backlog waits for the next round
            sock.setblocking(False)
            conn = _Conn(sock, int(peer[1]), False)
            self._count_in(conn)
            self.conns[sock.fileno()] = conn
            self._flush(conn)
            if sock.fileno() in self.conns:
                self._watch(conn)

    def _watch(self, conn: _Conn) -> None:
        wanted = 0
        if not conn.eof and not conn.closing and conn.out_bytes < OUT_HIGH_WATER:
            wanted |= select.EPOLLIN
        if conn.out_bytes or conn.source is not None:
            wanted |= select.EPOLLOUT
        if wanted == conn.events:
            return
        if conn.events == 0:
            self.poll.register(conn.sock.fileno(), wanted)
        elif wanted:
            self.poll.modify(conn.sock.fileno(), wanted)
        else:
            self.poll.unregister(conn.sock.fileno())
        conn.events = wanted

    def _on_event(self, conn: _Conn, mask: int) -> None:
        fd = conn.sock.fileno()
        if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not conn.eof:
            self._read(conn)
        if fd in self.conns:
            self._flush(conn)
        if fd in self.conns:
            self._watch(conn)

    def _read(self, conn: _Conn) -> None:
        while conn.out_bytes < OUT_HIGH_WATER and not conn.closing:
            try:
                data = conn.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            if not data:
                conn.eof = True
                self._on_eof(conn)
                return
            self._on_data(conn, data)

    def _on_data(self, conn: _Conn, data: bytes) -> None:
        if not conn.mode:
            conn.header += data
            line, newline, rest = conn.header.partition(b"\n")
            if not newline:
                if len(conn.header) > 200:
                    self._close(conn)
                return
            words = line.decode("ascii", "replace").split()
            conn.mode = words[0] if words else "?"
            if conn.mode == "small":
                conn.expected = int(words[1])
            elif conn.mode == "source":
                conn.source = stream(int(words[2]), int(words[1]))
            elif conn.mode not in ("echo", "digest"):
                self._close(conn)
                return
            data = rest
            if conn.mode == "small" and conn.expected == 0:
                self._reply(conn)
                return
            if not data:
                return
        if conn.mode == "echo":
            conn.out.append(memoryview(data))
            conn.out_bytes += len(data)
        elif conn.mode in ("small", "digest"):
            conn.hasher.update(data)
            conn.received += len(data)
            if conn.mode == "small" and conn.received >= conn.expected:
                self._reply(conn)
        # "source": a request says nothing after its line

    def _on_eof(self, conn: _Conn) -> None:
        if conn.mode == "digest":
            self._reply(conn)
        else:  # echo: the rest, then EOF; any other: the client gave up first
            conn.closing = True

    def _reply(self, conn: _Conn) -> None:
        text = f"{conn.hasher.hexdigest()} {conn.received}\n".encode()
        conn.out.append(memoryview(text))
        conn.out_bytes += len(text)
        conn.closing = True

    def _flush(self, conn: _Conn) -> None:
        sock = conn.sock
        while True:
            if not conn.out and conn.source is not None:
                block = next(conn.source, None)
                if block is None:
                    conn.source = None
                    conn.closing = True
                else:
                    conn.out.append(memoryview(block))
                    conn.out_bytes += len(block)
            if not conn.out:
                break
            head = conn.out[0]
            try:
                sent = sock.send(head)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            conn.out_bytes -= sent
            if sent == len(head):
                conn.out.popleft()
            else:
                conn.out[0] = head[sent:]
                return
        if conn.closing:
            if conn.mode == "echo":
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        self._count_out(conn)  # before close(): nobody can see the end earlier
        if conn.events:
            with contextlib.suppress(OSError):
                self.poll.unregister(fd)
        self.conns.pop(fd, None)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for conn in list(self.conns.values()):
            self._close(conn)
        self.poll.close()
        self.listener.close()
