"""Admission costs no system call per connection: `strace -f -c` attached to the master
and its workers over a fixed number of connections finds no semaphore call at all and no
futex call per connection (futex(2) is only for --on-limit=queue's waits)."""

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.proxy import run_backend, run_proxy, wait_until

CONNECTIONS = 300


def _traced_by(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def _summary(path: Path) -> dict[str, int]:
    """Calls per system call from `strace -c` output."""
    calls = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    return calls


def _request(address: object, index: int) -> None:
    payload = b"request %d" % index
    with socket.create_connection(address, timeout=10) as client:  # type: ignore[arg-type]
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(4096):
            received += chunk
    assert received == payload


@pytest.mark.parametrize("options", [[], ["--max-connections-per-source=4"]])
def test_no_semaphore_and_no_futex_per_connection(workdir: Path, options: list[str]) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is missing")
    with (
        run_backend("echo") as backend,
        run_proxy(["-w", "2", *options, backend.target], workdir) as proxy,
    ):
        pids = [proxy.pid, *proxy.workers()]
        output = workdir / "strace-summary.txt"
        tracer = subprocess.Popen(
            [strace, "-f", "-c", "-o", str(output), *(f"-p{pid}" for pid in pids)],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(
                lambda: all(_traced_by(pid) == tracer.pid for pid in pids), 10, "strace attached"
            )
            for index in range(CONNECTIONS):
                _request(proxy.address(), index)
        finally:
            tracer.send_signal(signal.SIGINT)  # detach and write the summary
            tracer.wait(30)
    calls = _summary(output)
    assert calls.get("accept4", 0) + calls.get("accept", 0) >= CONNECTIONS  # it did trace them
    assert not {"semop", "semtimedop", "semget", "semctl"} & calls.keys(), calls
    assert calls.get("futex", 0) < CONNECTIONS / 10, calls
