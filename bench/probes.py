"""Is a contender relaying yet? One small end-to-end exchange per backend kind, retried.

A probe passes only when bytes came back from the backend through the proxy, which is
also how a socket-activated proxy gets started (systemd-socket-activate execs it on the
first connection). Never measures.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable

from bench.procs import LOOPBACK
from bench.tools import Tools

PROBE_TIMEOUT = 2.0
# iperf3's answer while its server is still busy with the previous test, and how long to
# wait for it to be free.
IPERF3_BUSY = "the server is busy"
IPERF3_BUSY_TIMEOUT = 5.0
# Extra successful exchanges after the first, so every prefork worker has had a chance to
# be up before the clock starts.
SETTLE_PROBES = 4

Probe = Callable[[int], str | None]


def http_probe(path: str, expected_bytes: int) -> Probe:
    def probe(port: int) -> str | None:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=PROBE_TIMEOUT) as sock:
                sock.sendall(f"GET {path} HTTP/1.0\r\nHost: probe\r\n\r\n".encode())
                response = _read_to_eof(sock)
        except OSError as error:
            return f"HTTP probe: {error}"
        head, _, body = response.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or len(body) != expected_bytes:
            return f"HTTP probe: unexpected answer {head[:40]!r} with {len(body)} body bytes"
        return None

    return probe


def echo_probe(port: int) -> str | None:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=PROBE_TIMEOUT) as sock:
            sock.sendall(b"probe\n")
            answer = b""
            while len(answer) < 6:
                chunk = sock.recv(64)
                if not chunk:
                    break
                answer += chunk
    except OSError as error:
        return f"echo probe: {error}"
    return None if answer == b"probe\n" else f"echo probe: got {answer!r}"


def iperf3_probe(tools: Tools) -> Probe:
    def probe(port: int) -> str | None:
        # The server takes one test at a time and may still be closing the last one after
        # its client has exited; it says so at once, before any data. No signal to wait on.
        deadline = time.monotonic() + IPERF3_BUSY_TIMEOUT
        while IPERF3_BUSY in (error := one_test(port) or "") and time.monotonic() < deadline:
            time.sleep(0.1)
        return error or None

    def one_test(port: int) -> str | None:
        assert tools.iperf3 is not None
        argv = [tools.iperf3, "--client", LOOPBACK, "--port", str(port), "--bytes", "64K"]
        argv += ["--json", "--connect-timeout", str(int(PROBE_TIMEOUT * 1000))]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return "iperf3 probe: no result in 10 s"
        try:
            report = json.loads(done.stdout)
        except json.JSONDecodeError:
            return f"iperf3 probe: exit {done.returncode}: {done.stderr.strip()[:200]}"
        if done.returncode != 0 or "error" in report:
            return f"iperf3 probe: {report.get('error', f'exit {done.returncode}')}"
        return None

    return probe


def wait_relaying(
    probe: Probe, port: int, timeout: float, alive: Callable[[], bool] | None = None
) -> str | None:
    """Retry `probe` until it passes, `timeout` ends or the proxy exits; None on success."""
    deadline = time.monotonic() + timeout
    error: str | None = "not probed"
    while time.monotonic() < deadline:
        error = probe(port)
        if error is None:
            break
        if alive is not None and not alive():
            return f"exited before relaying ({error})"
        time.sleep(0.05)
    if error is not None:
        return error
    for _ in range(SETTLE_PROBES):
        error = probe(port)
        if error is not None:
            return f"passed once, then {error}"
    return None


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
