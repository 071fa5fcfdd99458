"""The two ends of the UDP bench, each run as its own process: an echo target, and a
request/response load of many client sockets.

    python -m bench.udp_peers echo                      prints "READY PORT", echoes forever
    python -m bench.udp_peers load PORT SOCKETS SECONDS SIZE
        prints one JSON line: exchanges completed, lost, wrong, seconds

Each load socket keeps one request in flight: it sends, waits for the reply (which must
be its own request back, byte for byte), and sends the next. A request without a reply
after LOSS_TIMEOUT counts as lost and the socket goes on. One process, one epoll: the
load is a fixed number of outstanding requests, so what it measures is how fast the
path in between turns them around. Measures, never asserts.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time

LOOPBACK = "127.0.0.1"
BUFFER = 8 << 20  # socket buffers asked for; the kernel caps them at net.core.*mem_max
LOSS_TIMEOUT = 1.0
_SEQUENCE = struct.Struct("!Q")


def serve_echo() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    sock.bind((LOOPBACK, 0))
    print(f"READY {sock.getsockname()[1]}", flush=True)
    buffer = bytearray(65536)
    view = memoryview(buffer)
    recvfrom_into = sock.recvfrom_into
    sendto = sock.sendto
    while True:
        count, sender = recvfrom_into(buffer)
        try:
            sendto(view[:count], sender)
        except OSError:
            pass  # a client gone (ICMP error pending): an echo server goes on


def run_load(port: int, sockets: int, seconds: float, size: int) -> dict[str, float]:
    padding = bytes(max(0, size - _SEQUENCE.size))
    clients: dict[int, socket.socket] = {}
    sequences: dict[int, int] = {}
    sent_at: dict[int, float] = {}
    poller = select.epoll()
    for _ in range(sockets):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        sock.connect((LOOPBACK, port))
        sock.setblocking(False)
        clients[sock.fileno()] = sock
        sequences[sock.fileno()] = 0
        poller.register(sock.fileno(), select.EPOLLIN)
    exchanges = lost = wrong = 0

    def send(fd: int, now: float) -> None:
        sequences[fd] += 1
        sent_at[fd] = now
        try:
            clients[fd].send(_SEQUENCE.pack(sequences[fd]) + padding)
        except OSError:
            pass  # refused (an ICMP error from an earlier datagram): counted lost later

    start = time.monotonic()
    deadline = start + seconds
    for fd in clients:
        send(fd, start)
    next_scan = start + LOSS_TIMEOUT / 4
    now = start
    while now < deadline:
        for fd, _ in poller.poll(0.05):
            sock = clients[fd]
            while True:
                try:
                    reply = sock.recv(65536)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                if len(reply) == max(size, _SEQUENCE.size) and reply[:8] == _SEQUENCE.pack(
                    sequences[fd]
                ):
                    exchanges += 1
                    send(fd, time.monotonic())
                else:
                    wrong += 1  # a late reply to a request counted lost, or a bad one
        now = time.monotonic()
        if now >= next_scan:
            next_scan = now + LOSS_TIMEOUT / 4
            for fd, at in list(sent_at.items()):
                if now - at > LOSS_TIMEOUT:
                    lost += 1
                    send(fd, now)
    elapsed = time.monotonic() - start
    for sock in clients.values():
        sock.close()
    poller.close()
    return {"exchanges": exchanges, "lost": lost, "wrong": wrong, "seconds": elapsed}


def main() -> None:
    mode = sys.argv[1]
    if mode == "echo":
        serve_echo()
    elif mode == "load":
        port, sockets, seconds, size = sys.argv[2:6]
        print(json.dumps(run_load(int(port), int(sockets), float(seconds), int(size))))
    else:
        raise SystemExit(f"unknown mode {mode!r}: echo or load")


if __name__ == "__main__":
    main()
