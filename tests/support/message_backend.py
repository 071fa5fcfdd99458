"""Targets that keep message boundaries, for integration tests, run as their own process.

    python -m tests.support.message_backend MODE ADDRESS

MODE:
  echo     every datagram (or sequential packet) is sent back whole to whoever sent it
  check    every message must be a `framed` one (see below), checked on arrival; each is
           answered "ok N" (N: its sequence number) or "bad ..."; a sequential-packet
           connection is answered message by message and gets "end N" (the count) at
           its end, before the target shuts down its side
  log      every message must be a framed one, checked on arrival, and a line "ok N" or
           "bad ..." is printed on stdout for it; nothing is answered
  silent   reads datagrams and never answers

ADDRESS: udp:HOST:PORT (PORT 0 picks a free one), unix-dgram:/path, unix-dgram:@name,
seqpacket:/path, seqpacket:@name. Prints "READY <target>" on stdout (the address as a
forkproxy target) once bound.

A framed message says what it should be, so a receiver can tell one that was cut, merged
or reordered: 4 bytes sequence number, 4 bytes length of the whole message, 32 bytes
SHA-256 of what follows, then the body.
"""

import hashlib
import random
import socket
import struct
import sys
import threading

HEADER = struct.Struct("!II32s")
BIG_BUFFER = 8 << 20  # asked for; the kernel caps it at net.core.rmem_max


def framed(sequence: int, length: int, seed: int = 0) -> bytes:
    """A message of `length` bytes (at least HEADER.size) that describes itself."""
    body = random.Random(seed * 1_000_003 + sequence).randbytes(length - HEADER.size)
    return HEADER.pack(sequence, length, hashlib.sha256(body).digest()) + body


def check_framed(message: bytes) -> int:
    """The sequence number of a sound framed message; ValueError if it is not one."""
    if len(message) < HEADER.size:
        raise ValueError(f"{len(message)} bytes: shorter than a header")
    sequence, length, digest = HEADER.unpack_from(message)
    if length != len(message):
        raise ValueError(f"message {sequence}: {len(message)} bytes, its header says {length}")
    if hashlib.sha256(memoryview(message)[HEADER.size :]).digest() != digest:
        raise ValueError(f"message {sequence}: its body does not match its digest")
    return int(sequence)


def _answer(message: bytes) -> bytes:
    try:
        return b"ok %d" % check_framed(message)
    except ValueError as error:
        return b"bad " + str(error).encode()


def bind(address: str) -> tuple[socket.socket, str]:
    kind, _, rest = address.partition(":")
    if kind == "udp":
        host, _, port = rest.rpartition(":")
        family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host.strip("[]"), int(port)))
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
        target = f"udp:{shown}:{bound[1]}"
    elif kind in ("unix-dgram", "seqpacket"):
        sock_type = socket.SOCK_DGRAM if kind == "unix-dgram" else socket.SOCK_SEQPACKET
        sock = socket.socket(socket.AF_UNIX, sock_type)
        sock.bind("\0" + rest[1:] if rest.startswith("@") else rest)
        target = address
    else:
        raise SystemExit(f"unknown address kind {kind!r}")
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, BIG_BUFFER)
    if sock.type == socket.SOCK_SEQPACKET:
        sock.listen(128)
    return sock, target


def serve_datagrams(sock: socket.socket, mode: str) -> None:
    while True:
        message, sender = sock.recvfrom(1 << 23)
        if mode == "log":
            print(_answer(message).decode(), flush=True)
            continue
        if mode == "silent" or not sender:
            continue
        try:
            sock.sendto(message if mode == "echo" else _answer(message), sender)
        except OSError:
            pass  # a client gone: as a real server would, go on


def serve_connection(conn: socket.socket, mode: str) -> None:
    with conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BIG_BUFFER)
        count = 0
        while True:
            message = conn.recv(1 << 23)
            if not message:  # the end (this backend is never sent empty messages)
                break
            count += 1
            conn.send(message if mode == "echo" else _answer(message))
        if mode == "check":
            conn.send(b"end %d" % count)
        conn.shutdown(socket.SHUT_WR)


def main() -> None:
    mode, address = sys.argv[1], sys.argv[2]
    if mode not in ("echo", "check", "log", "silent"):
        raise SystemExit(f"unknown mode {mode!r}")
    sock, target = bind(address)
    print(f"READY {target}", flush=True)
    if sock.type != socket.SOCK_SEQPACKET:
        serve_datagrams(sock, mode)
        return
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve_connection, args=(conn, mode), daemon=True).start()


if __name__ == "__main__":
    main()
