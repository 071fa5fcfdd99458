"""Open-loop HTTP client: GET requests at a fixed rate, latency measured from the intended send.

Run as `python -m bench.paced --port P --rate R --duration S`; prints one JSON line.

Request i is due at start + i/rate whatever happened before it (open loop). It goes out on
the first idle keep-alive connection; when none is idle it waits, and that wait counts in
its latency, so a stall shows in the tail instead of silently lowering the rate (the
"coordinated omission" wrk's closed loop has). Requests due in the warm-up are sent but not
recorded. Never more than `connections` requests in flight, never more than 2 s of backlog.

The clock of a request starts when the loop finds it due: the client's own timer slack is
not the proxy's latency. epoll(7) waits in whole milliseconds, so with nothing in flight
the loop sleeps with nanosecond timers (and a 1 ns timer slack) instead; how late it woke
is reported as `wake_late_*`.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import select
import socket
import sys
import time
from collections import deque

NS = 1_000_000_000
HEADER_END = b"\r\n\r\n"
PR_SET_TIMERSLACK = 29  # prctl(2)


def tighten_timer_slack() -> None:
    """Ask for 1 ns timer slack instead of the default 50 µs; harmless if refused."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Connection:
    __slots__ = ("sock", "buffer", "due_ns", "recorded", "expected")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.due_ns = 0  # when the loop found the request in flight due
        self.recorded = False  # False during the warm-up
        self.expected = -1  # total response length once the header is parsed

    def response_complete(self) -> bool:
        if self.expected < 0:
            end = self.buffer.find(HEADER_END)
            if end < 0:
                return False
            length = 0
            for line in bytes(self.buffer[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.expected = end + len(HEADER_END) + length
        return len(self.buffer) >= self.expected


def run(
    host: str, port: int, path: str, rate: float, duration: float, connections: int, warmup: float
) -> dict[str, object]:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    poller = select.epoll()
    by_fd: dict[int, Connection] = {}
    idle: list[Connection] = []
    for _ in range(connections):
        sock = socket.create_connection((host, port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        connection = Connection(sock)
        by_fd[sock.fileno()] = connection
        idle.append(connection)
        poller.register(sock.fileno(), select.EPOLLIN)

    interval_ns = NS / rate
    start_ns = time.perf_counter_ns()
    record_from_ns = start_ns + int(warmup * NS)
    end_ns = start_ns + int((warmup + duration) * NS)
    give_up_ns = end_ns + 5 * NS
    max_backlog = int(rate * 2) + connections
    due: deque[tuple[int, int]] = deque()  # (intended, found due)
    latencies_ns: list[int] = []
    late_ns: list[int] = []
    sent = 0
    errors: dict[str, int] = {}
    index = 0
    next_ns = start_ns
    in_flight = 0
    gc.disable()
    while True:
        now = time.perf_counter_ns()
        while next_ns <= now and next_ns < end_ns:
            due.append((next_ns, now))
            if next_ns >= record_from_ns:
                late_ns.append(now - next_ns)
            index += 1
            next_ns = start_ns + int(index * interval_ns)
        if len(due) > max_backlog:
            errors["backlog over 2 s: rate not sustained"] = len(due)
            break
        while due and idle:
            connection = idle.pop()
            intended_ns, connection.due_ns = due.popleft()
            connection.recorded = intended_ns >= record_from_ns
            connection.buffer.clear()
            connection.expected = -1
            connection.sock.send(request)
            sent += 1
            in_flight += 1
        if next_ns >= end_ns and not due and in_flight == 0:
            break
        if now >= give_up_ns:
            errors["no response before the end"] = in_flight
            break
        wait_ns = next_ns - now if next_ns < end_ns else 50_000_000
        if in_flight == 0 and not due and wait_ns > 0:
            time.sleep(wait_ns / NS)
            continue
        for fd, _events in poller.poll(max(wait_ns, 0) / NS):
            connection = by_fd[fd]
            try:
                data = connection.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                errors["connection closed"] = errors.get("connection closed", 0) + 1
                poller.unregister(fd)
                in_flight -= 1
                continue
            connection.buffer += data
            if connection.response_complete():
                done_ns = time.perf_counter_ns()
                if connection.recorded:
                    latencies_ns.append(done_ns - connection.due_ns)
                if not connection.buffer.startswith(b"HTTP/1.1 200"):
                    errors["status not 200"] = errors.get("status not 200", 0) + 1
                in_flight -= 1
                idle.append(connection)
    gc.enable()
    for connection in by_fd.values():
        connection.sock.close()
    summary = summarize(latencies_ns, sent, errors, rate, duration)
    late = sorted(late_ns)
    summary["wake_late_p50_us"] = percentile(late, 0.50) / 1000
    summary["wake_late_p99_us"] = percentile(late, 0.99) / 1000
    return summary


def percentile(ordered: list[int], share: float) -> float:
    """Nearest-rank percentile of an ascending list; 0 when empty."""
    if not ordered:
        return 0.0
    rank = min(len(ordered) - 1, max(0, int(round(share * len(ordered))) - 1))
    return float(ordered[rank])


def summarize(
    latencies_ns: list[int], sent: int, errors: dict[str, int], rate: float, duration: float
) -> dict[str, object]:
    ordered = sorted(latencies_ns)

    def percentile_us(share: float) -> float:
        return percentile(ordered, share) / 1000

    return {
        "rate": rate,
        "duration": duration,
        "sent": sent,
        "recorded": len(ordered),
        "errors": errors,
        "p50_us": percentile_us(0.50),
        "p90_us": percentile_us(0.90),
        "p99_us": percentile_us(0.99),
        "p999_us": percentile_us(0.999),
        "max_us": ordered[-1] / 1000 if ordered else 0.0,
        "mean_us": sum(ordered) / len(ordered) / 1000 if ordered else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/small.txt")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    tighten_timer_slack()
    try:
        result = run(
            args.host, args.port, args.path, args.rate, args.duration, args.connections, args.warmup
        )
    except OSError as error:
        result = {"errors": {f"client: {error}": 1}, "recorded": 0}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
