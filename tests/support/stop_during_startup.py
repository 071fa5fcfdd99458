"""Start forkproxy again and again and SIGTERM it at random moments of its start-up; then
report, as JSON, what is left: processes of its session and System V IPC objects.

    python -m tests.support.stop_during_startup RUNS SEED -- ARGS...

First it measures how long forkproxy takes from exec to READY=1 with these ARGS (about
150 ms on an idle machine, more under load or with a slow set-up); the SIGTERMs then fall
at random moments of that span, before, during and after the master's set-up. Each run
binds `--listen 127.0.0.1:PORT` (a port free a moment before). Meant to run in an IPC
namespace of its own (`unshare --ipc`), where any IPC object at the end is a leak.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FORKPROXY = str(Path(sys.executable).parent / "forkproxy")


def session_members(session: int) -> list[int]:
    """Live processes of session `session`, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            members.append(int(entry))
    return members


def ipc_ids(kind: str) -> list[str]:
    """The ids `ipcs` lists for kind -s, -m or -q."""
    lines = subprocess.run(
        ["ipcs", kind], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return [line.split()[1] for line in lines if line.startswith("0x")]


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return subprocess.Popen(
        [FORKPROXY, f"--listen=127.0.0.1:{port}", *args],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )


def stop(process: subprocess.Popen[bytes]) -> tuple[int, list[int]]:
    """SIGTERM, wait; its exit status and what is left of its session after a while."""
    process.send_signal(signal.SIGTERM)
    status = process.wait(60)
    deadline = time.monotonic() + 10
    while session_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.02)  # workers see their master gone within a heartbeat
    left = session_members(process.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return status, left


def time_to_ready(args: list[str]) -> float:
    """Seconds from exec to READY=1 on $NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        path = f"/tmp/fp-notify-{os.getpid()}.sock"
        notify.bind(path)
        try:
            started = time.monotonic()
            process = start(args, {**os.environ, "NOTIFY_SOCKET": path})
            notify.settimeout(60)
            while b"READY=1" not in notify.recv(4096):
                pass
            ready = time.monotonic() - started
            stop(process)
        finally:
            os.unlink(path)
    return ready


def main() -> None:
    separator = sys.argv.index("--")
    runs, seed = (int(value) for value in sys.argv[1:separator])
    args = sys.argv[separator + 1 :]
    chooser = random.Random(seed)
    span = max(time_to_ready(args), time_to_ready(args))
    report: dict[str, object] = {"ready_ms": round(span * 1000), "exits": [], "leftover": []}
    for _ in range(runs):
        delay = chooser.uniform(0, span)
        process = start(args)
        time.sleep(delay)  # the point: a random moment of the start-up
        status, left = stop(process)
        report["exits"].append([round(delay * 1000, 1), status])  # type: ignore[union-attr]
        report["leftover"].extend(left)  # type: ignore[union-attr]
    for kind, name in (("-s", "semaphores"), ("-m", "shared_memory"), ("-q", "queues")):
        report[name] = ipc_ids(kind)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
