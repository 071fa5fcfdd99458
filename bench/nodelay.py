"""`python -m bench.nodelay`: round trips whose answer comes in two writes, through forkproxy
with --nodelay and with --no-nodelay (how its default was chosen).

A backend answers each 1-byte request with HEAD bytes, then, after GAP seconds (so the
proxy has already forwarded the first part), TAIL bytes. With Nagle's algorithm on the
proxy's client socket, the second part waits until the client ACKs the first, and the
client delays that ACK (tcp(7): delayed ACKs, 40 ms minimum on Linux). Request/response
protocols that write a header and then a body, or a command's output in pieces, meet
this on every exchange. Loopback only; measures and never asserts.
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _backend(server: socket.socket, head: int, tail: int, gap: float) -> None:
    def serve(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while conn.recv(1):
                conn.sendall(b"h" * head)
                time.sleep(gap)
                conn.sendall(b"t" * tail)

    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _round_trips(port: int, count: int, size: int) -> list[float]:
    deadline = time.monotonic() + 10
    while True:
        try:
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # bounded wait for the proxy to listen
    times = []
    with client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            started = time.perf_counter()
            client.sendall(b"?")
            received = 0
            while received < size:
                received += len(client.recv(size - received))
            times.append(time.perf_counter() - started)
    return times


def measure(forkproxy: str, option: str, count: int, head: int, tail: int, gap: float) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_backend, args=(server, head, tail, gap), daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = f"127.0.0.1:{server.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    process = subprocess.Popen(
        [forkproxy, "-w", "1", option, f"--listen=127.0.0.1:{port}", target],
        env=env,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        times = _round_trips(port, count, head + tail)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        server.close()
    times.sort()
    print(
        f"{option:13} round trips {count}: p50 {statistics.median(times) * 1e3:7.2f} ms, "
        f"p99 {times[int(len(times) * 0.99) - 1] * 1e3:7.2f} ms, "
        f"total {sum(times):6.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nodelay", description=__doc__)
    parser.add_argument("--forkproxy", default=str(Path(sys.executable).parent / "forkproxy"))
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--head", type=int, default=200, help="bytes of the first write")
    parser.add_argument("--tail", type=int, default=200, help="bytes of the second write")
    parser.add_argument("--gap", type=float, default=0.001, help="seconds between the writes")
    args = parser.parse_args()
    for option in ("--nodelay", "--no-nodelay"):
        measure(args.forkproxy, option, args.count, args.head, args.tail, args.gap)


if __name__ == "__main__":
    main()
