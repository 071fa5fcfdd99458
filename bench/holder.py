"""A client process that opens connections through a proxy, checks each relays, and holds them.

Run as `python -m bench.holder --host H --port P`; driven by `bench.holding` over a line
protocol, one JSON object per line each way:

    {"op": "open", "count": N, "timeout": S}
        -> {"held": total, "opened": n, "failed": n, "errors": {reason: n}}
    {"op": "verify", "timeout": S} -> {"held": alive, "dropped": n, "errors": {reason: n}}
    {"op": "close"} -> {"closed": n}

A connection counts as held only once a ping has come back through the proxy from the echo
backend: a kernel-completed handshake sitting in a full proxy's backlog is not held. Failed
and closed connections are reset (SO_LINGER 0) so no TIME_WAIT piles up. Never listens.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import select
import socket
import struct
import sys
import time
from collections import Counter

PING = b"ping\n"
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class Holder:
    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.held: dict[int, socket.socket] = {}

    def open(self, count: int, timeout: float) -> dict[str, object]:
        """Open `count` connections at once; keep those whose ping is echoed by the deadline."""
        errors: Counter[str] = Counter()
        pending: dict[int, tuple[socket.socket, bool]] = {}  # fd -> (socket, ping sent)
        poller = select.epoll()
        for _ in range(count):
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError as error:
                errors[f"client {_errno_name(error)}"] += 1
                break
            sock.setblocking(False)
            code = sock.connect_ex(self.address)
            if code not in (0, errno.EINPROGRESS):
                errors[errno.errorcode.get(code, str(code))] += 1
                _reset(sock)
                continue
            pending[sock.fileno()] = (sock, False)
            poller.register(sock.fileno(), select.EPOLLOUT)
        opened = self._settle(poller, pending, errors, timeout)
        poller.close()
        failed = sum(errors.values())
        return {"held": len(self.held), "opened": opened, "failed": failed, "errors": errors}

    def verify(self, timeout: float) -> dict[str, object]:
        """Ping every held connection again; drop those that do not answer."""
        errors: Counter[str] = Counter()
        pending: dict[int, tuple[socket.socket, bool]] = {}
        poller = select.epoll()
        for fd, sock in list(self.held.items()):
            del self.held[fd]
            pending[fd] = (sock, False)
            poller.register(fd, select.EPOLLOUT)
        alive = self._settle(poller, pending, errors, timeout)
        poller.close()
        return {"held": alive, "dropped": sum(errors.values()), "errors": errors}

    def close(self) -> dict[str, object]:
        closed = len(self.held)
        for sock in self.held.values():
            _reset(sock)
        self.held.clear()
        return {"closed": closed}

    def _settle(
        self,
        poller: select.epoll,
        pending: dict[int, tuple[socket.socket, bool]],
        errors: Counter[str],
        timeout: float,
    ) -> int:
        """Drive connect, ping and echo for `pending` until each is held or failed."""
        settled = 0
        received: Counter[int] = Counter()
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, events in poller.poll(remaining):
                sock, ping_sent = pending[fd]
                if not ping_sent:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        reason = errno.errorcode.get(code, str(code))
                        self._fail(poller, pending, fd, reason, errors)
                        continue
                    try:
                        sock.send(PING)
                    except OSError as error:
                        self._fail(poller, pending, fd, _errno_name(error), errors)
                        continue
                    pending[fd] = (sock, True)
                    poller.modify(fd, select.EPOLLIN)
                    continue
                try:
                    data = sock.recv(64)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as error:
                    self._fail(poller, pending, fd, _errno_name(error), errors)
                    continue
                if not data:
                    self._fail(poller, pending, fd, "closed by proxy", errors)
                    continue
                received[fd] += len(data)
                if received[fd] >= len(PING):
                    poller.unregister(fd)
                    del pending[fd]
                    self.held[fd] = sock
                    settled += 1
                elif events & (select.EPOLLERR | select.EPOLLHUP):
                    self._fail(poller, pending, fd, "hangup", errors)
        for fd in list(pending):
            self._fail(poller, pending, fd, "no echo before deadline", errors)
        return settled

    @staticmethod
    def _fail(
        poller: select.epoll,
        pending: dict[int, tuple[socket.socket, bool]],
        fd: int,
        reason: str,
        errors: Counter[str],
    ) -> None:
        sock, _ping_sent = pending.pop(fd)
        poller.unregister(fd)
        _reset(sock)
        errors[reason] += 1


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    sock.close()


def _errno_name(error: OSError) -> str:
    return errno.errorcode.get(error.errno or 0, str(error))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    holder = Holder(args.host, args.port)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "open":
            reply = holder.open(int(command["count"]), float(command["timeout"]))
        elif command["op"] == "verify":
            reply = holder.verify(float(command["timeout"]))
        elif command["op"] == "close":
            reply = holder.close()
        else:
            reply = {"error": f"unknown op {command['op']!r}"}
        print(json.dumps(reply), flush=True)
    holder.close()


if __name__ == "__main__":
    main()
