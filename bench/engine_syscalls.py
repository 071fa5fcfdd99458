"""System calls per churned connection through the compiled engine alone (strace -c -f).

One connection at a time, as issue 16 counts them: the client connects, sends a short
HTTP request, reads the response and the target's close, and closes. The engine runs in a
process of its own with a plain select() loop standing in for the worker's uvloop (its
pselect6 calls are listed apart: the real worker pays uvloop's epoll_wait there instead).
The target answers 600 bytes and closes, as nginx with `Connection: close`. Measures and
never asserts. Until the worker integration lands, this uses the tests' harness mapping.

    python -m bench.engine_syscalls [CONNECTIONS] [--copy-size N] [--pipe-size N]
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import tempfile
import time

from tests.unit.relay import engine_harness as h

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 600\r\nConnection: close\r\n\r\n" + b"x" * 600
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
OUTER_LOOP_CALLS = ("pselect6", "select")


def _target(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        conn.recv(4096)
        conn.sendall(RESPONSE)
        conn.close()


def _engine(listener: socket.socket, mapping: h.SharedMapping, port: int, args: object) -> None:
    module = h.load_engine()
    assert module is not None, "build the extension first: python setup.py build_ext --inplace"
    engine = module.Engine(
        mapping.memory,
        h.LAYOUT,
        0,
        [(listener.fileno(), 0)],
        [[h.tcp_target(port)]],
        h.Hooks(),
        pipe_size=args.pipe_size,  # type: ignore[attr-defined]
        copy_size=args.copy_size,  # type: ignore[attr-defined]
    )
    engine.start_accepting()
    fd = engine.fileno()
    while True:
        select.select([fd], [], [])
        engine.dispatch()


def _churn(port: int, count: int) -> None:
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(REQUEST)
        received = b""
        while data := client.recv(65536):
            received += data
        assert received == RESPONSE
        client.close()


def _fork(run: object, *args: object) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            run(*args)  # type: ignore[operator]
        finally:
            os._exit(1)
    return pid


def _cpu_seconds(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("connections", type=int, nargs="?", default=1000)
    parser.add_argument("--copy-size", type=int, default=0)
    parser.add_argument("--pipe-size", type=int, default=0)
    args = parser.parse_args()

    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(1024)
    listener = h.listener(backlog=1024)
    mapping = h.SharedMapping(1000)
    pids = [_fork(_target, target)]
    pids.append(_fork(_engine, listener, mapping, target.getsockname()[1], args))
    port = listener.getsockname()[1]
    try:
        _churn(port, 100)  # warm: the pipe pool, the page cache
        with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
            strace = subprocess.Popen(
                ["strace", "-c", "-f", "-o", out.name, "-p", str(pids[1])],
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # strace attaches
            _churn(port, args.connections)
            time.sleep(0.2)
            strace.send_signal(signal.SIGINT)
            strace.wait()
            table = out.read()
        calls: dict[str, int] = {}
        for line in table.splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                calls[parts[-1]] = int(parts[3])
        before = _cpu_seconds(pids[1])
        _churn(port, args.connections)
        after = _cpu_seconds(pids[1])
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    n = args.connections
    outer = sum(calls.get(name, 0) for name in OUTER_LOOP_CALLS)
    engine_calls = sum(calls.values()) - outer
    print(f"system calls per churned connection ({n} connections, one at a time):")
    for name, count in sorted(calls.items(), key=lambda item: -item[1]):
        print(f"  {name:14} {count / n:6.2f}")
    print(f"  engine total   {engine_calls / n:6.2f}  (+ {outer / n:.2f} of the select loop)")
    user, system = (after[0] - before[0]) / n * 1e6, (after[1] - before[1]) / n * 1e6
    print(f"engine CPU per connection: {user + system:.0f} us (user {user:.0f}, sys {system:.0f});")
    print("sys includes loopback peers' TCP work done in the engine's calls")


if __name__ == "__main__":
    main()
