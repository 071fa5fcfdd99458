"""`python -m bench.soak --duration 60`: forkproxy under mixed load while workers are killed.

Runs the real forkproxy (-w 2, a -c cap, --metrics on a unix socket) in front of
`bench.soak_backend`, with client threads doing bulk downloads and uploads, echoes ended
by a half-close, small requests and quick churn, every byte checked (compared with what
was sent or what the backend's stream must be, or by SHA-256). Every `--kill-interval`
the oldest worker is SIGKILLed. Prints a summary and exits 0, or 1 on any unexplained
failure, any corrupted byte, the cap exceeded at the backend, or forkproxy not surviving.

Honest attribution: before each kill the victim is SIGSTOPped, and the connections it
holds are read from its fd table and ss(8) (client ports on the listener, its upstream
ports to the backend). Once stopped it accepts nothing more, so exactly those die. A
failed connection is excused only if it was open at that instant and held by that pid.
A client that got no greeting was refused at the cap, unless a kill excuses it; there
may be no more of those than forkproxy itself counted as refused (its metrics). Corrupt
bytes are never excused: a dying worker can cut a stream short, not change it.

The one bench script that judges rather than only measures: its verdict is its purpose.
Loopback only; stops only the processes it started, by process group.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.soak_backend import SoakBackend
from bench.soak_clients import CONNECTION_TIMEOUT, SCENARIOS, Record, one_connection
from tests.support.procfs import OPEN_STATES, socket_inodes, tcp_sockets

REPO = Path(__file__).resolve().parents[1]
STOP_TIMEOUT = 30.0
# A worker killed sooner than this after its start counts as an early death for the
# master's crash-loop guard (master.STABLE_AFTER): kill only older ones.
STABLE_AFTER = 5.0
SURVIVED = "ok-though-killed"  # held by a killed worker, yet every byte had crossed


@dataclass(frozen=True, slots=True)
class Kill:
    at: float
    pid: int
    client_ports: frozenset[int]
    upstream_ports: frozenset[int]


# -- the run -----------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    args: argparse.Namespace
    workdir: Path
    records: list[Record] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def client_loop(run: Run, address: tuple[str, int], seed: int) -> None:
    rng = random.Random(seed)
    names, weights = zip(*SCENARIOS.items(), strict=True)
    while not run.stop.is_set():
        record = one_connection(address, rng.choices(names, weights)[0], rng)
        with run.lock:
            run.records.append(record)
        if record.outcome == "no-greeting":
            run.stop.wait(rng.uniform(0.005, 0.05))  # a refused client retries a bit later


def workers_of(master: int) -> list[int]:
    workers = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == master and fields[0] not in ("Z", "X"):
                    workers.append(int(entry))
    return workers


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def kill_oldest(master: int, listen_port: int, backend: SoakBackend) -> Kill:
    """SIGSTOP the oldest worker, note the connections it holds, then SIGKILL it."""
    victim = min(workers_of(master), key=lambda pid: int(_stat(pid)[19]))  # starttime
    os.kill(victim, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while _stat(victim)[0] != "T":  # stopped: it can accept nothing more
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker {victim} did not stop")
        time.sleep(0.001)
    at = time.monotonic()
    inodes = socket_inodes(victim)
    held = [tcp for tcp in tcp_sockets(*OPEN_STATES) if tcp.inode in inodes]
    clients = frozenset(t.remote[1] for t in held if t.local[1] == listen_port)
    upstreams = frozenset(t.local[1] for t in held if t.remote[1] == backend.port)
    backend.mark_dead(upstreams)
    os.kill(victim, signal.SIGKILL)
    return Kill(at, victim, clients, upstreams)


def killer_loop(run: Run, master: int, listen_port: int, backend: SoakBackend) -> None:
    interval = run.args.kill_interval
    started = time.monotonic()
    next_kill = started + interval
    while not run.stop.wait(max(0.0, next_kill - time.monotonic())):
        if time.monotonic() - started > run.args.duration - 2:
            return
        try:
            workers = workers_of(master)
            oldest = max(time.monotonic() - _start_time(pid) for pid in workers)
            if len(workers) == run.args.workers and oldest > STABLE_AFTER:
                kill = kill_oldest(master, listen_port, backend)
                with run.lock:
                    run.kills.append(kill)
                deadline = time.monotonic() + 10
                while kill.pid in workers_of(master) or len(workers_of(master)) < len(workers):
                    if time.monotonic() > deadline:
                        run.problems.append(f"worker {kill.pid} was not replaced within 10s")
                        return
                    run.stop.wait(0.01)
        except (OSError, RuntimeError) as error:
            run.problems.append(f"killing a worker: {error}")
            return
        next_kill += interval


_TICKS = os.sysconf("SC_CLK_TCK")


def _start_time(pid: int) -> float:
    """When `pid` started, on the monotonic clock (boot-relative, as /proc has it)."""
    with open("/proc/uptime") as uptime:
        up = float(uptime.read().split()[0])
    return time.monotonic() - (up - int(_stat(pid)[19]) / _TICKS)


def metrics(path: Path) -> dict[str, float]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    values = {}
    for line in data.decode().split("\r\n\r\n", 1)[-1].splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values


@contextlib.contextmanager
def forkproxy(args: argparse.Namespace, target: str, workdir: Path) -> Iterator[tuple]:
    """forkproxy with a listener bound here and passed as fd 3, until READY=1."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    notify.settimeout(0.2)
    log_path, metrics_path = workdir / "forkproxy.log", workdir / "metrics.sock"
    command = [
        *(sys.executable, "-m", "tests.support.activate", str(listener.fileno()), "--"),
        args.forkproxy,
        *("-w", str(args.workers), "-c", str(args.cap), "--metrics", str(metrics_path)),
        target,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "NOTIFY_SOCKET": str(workdir / "notify")},
            stdin=subprocess.DEVNULL,
            stderr=log,
            pass_fds=[listener.fileno()],
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        messages = b""
        while b"READY=1" not in messages:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"forkproxy did not start: {log_path.read_text()[-2000:]}")
            with contextlib.suppress(TimeoutError):
                messages += notify.recv(4096)
        yield process, listener.getsockname(), metrics_path, log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        notify.close()
        listener.close()


def soak(args: argparse.Namespace, workdir: Path) -> int:
    run = Run(args, workdir)
    backend = SoakBackend()
    try:
        with forkproxy(args, backend.target, workdir) as (process, address, metrics_path, log):
            master, started = process.pid, time.monotonic()
            clients = [
                threading.Thread(target=client_loop, args=(run, address, args.seed + index))
                for index in range(args.clients)
            ]
            killer = threading.Thread(target=killer_loop, args=(run, master, address[1], backend))
            for thread in [*clients, killer]:
                thread.start()
            run.stop.wait(args.duration)
            run.stop.set()
            for thread in [*clients, killer]:
                thread.join(CONNECTION_TIMEOUT + 10)
                if thread.is_alive():
                    run.problems.append(f"{thread.name} did not finish")
            elapsed = time.monotonic() - started
            if process.poll() is not None:
                run.problems.append(f"forkproxy exited with status {process.returncode}")
                counted = {}
            else:
                try:
                    counted = metrics(metrics_path)
                except OSError as error:
                    run.problems.append(f"cannot read forkproxy's metrics: {error}")
                    counted = {}
                if len(workers_of(master)) != args.workers:
                    run.problems.append(f"{len(workers_of(master))} workers at the end")
                process.send_signal(signal.SIGTERM)
                try:
                    if process.wait(STOP_TIMEOUT) != 0:
                        run.problems.append(f"forkproxy stopped with {process.returncode}")
                except subprocess.TimeoutExpired:
                    run.problems.append("forkproxy did not stop on SIGTERM")
            log_text = log.read_text(errors="replace")
    finally:
        backend.close()
    for marker in ("Traceback", "crashed"):
        if marker in log_text:
            run.problems.append(f"forkproxy logged {marker!r}")
    return report(run, backend, counted, elapsed, log_text)


def classify(run: Run) -> Counter[str]:
    """Each record's final outcome: ok, refused, killed, unexplained or corrupt."""
    outcomes: Counter[str] = Counter()
    for record in run.records:
        outcome = record.outcome
        if outcome in ("failed", "no-greeting"):
            if any(
                record.started <= kill.at <= record.ended and record.port in kill.client_ports
                for kill in run.kills
            ):
                outcome = "killed"
            elif outcome == "no-greeting":
                outcome = "refused"
            else:
                outcome = "unexplained"
        elif outcome == "ok" and any(
            record.started <= kill.at <= record.ended and record.port in kill.client_ports
            for kill in run.kills
        ):
            outcome = SURVIVED
        record.outcome = outcome
        outcomes[outcome] += 1
    return outcomes


def report(
    run: Run, backend: SoakBackend, counted: dict[str, float], elapsed: float, log: str
) -> int:
    args = run.args
    outcomes = classify(run)
    refused_counted = int(counted.get("forkproxy_connections_refused_total", -1))
    problems = list(run.problems)
    if outcomes["unexplained"]:
        problems.append(f"{outcomes['unexplained']} failures not explained by a kill")
    if outcomes["corrupt"]:
        problems.append(f"{outcomes['corrupt']} connections received corrupt bytes")
    if outcomes["refused"] > refused_counted:
        problems.append(
            f"{outcomes['refused']} clients got no greeting, forkproxy refused {refused_counted}"
        )
    if backend.peak > args.cap:
        problems.append(f"the backend saw {backend.peak} connections at once, cap {args.cap}")
    if not outcomes["ok"]:
        problems.append("no connection succeeded")
    if args.duration >= 3 * args.kill_interval and not run.kills:
        problems.append("no worker was killed")
    sent = sum(record.sent for record in run.records)
    received = sum(record.received for record in run.records)
    by_scenario = Counter((r.scenario, r.outcome) for r in run.records)
    print(
        f"soak: {elapsed:.1f}s, forkproxy -w {args.workers} -c {args.cap}, "
        f"{args.clients} clients, seed {args.seed}"
    )
    print(
        f"connections: {len(run.records)} ({len(run.records) / elapsed:.0f}/s): "
        + ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items()))
    )
    print(f"bytes: {sent / 2**20:.1f} MiB sent, {received / 2**20:.1f} MiB received, all checked")
    for scenario in SCENARIOS:
        cells = [f"{o} {n}" for (s, o), n in sorted(by_scenario.items()) if s == scenario]
        print(f"  {scenario}: " + ", ".join(cells))
    print(
        f"cap: backend peak {backend.peak} of {args.cap}, {backend.total} reached it, "
        f"{backend.excused} ended by kills; refusals seen {outcomes['refused']}, "
        f"counted by forkproxy {refused_counted}"
    )
    killed_connections = sum(len(kill.client_ports) for kill in run.kills)
    print(
        f"kills: {len(run.kills)} workers SIGKILLed holding {killed_connections} connections; "
        f"{outcomes['killed']} connections failed with them, "
        f"{outcomes[SURVIVED]} finished anyway (all bytes had crossed)"
    )
    for record in [r for r in run.records if r.outcome in ("unexplained", "corrupt")][:20]:
        print(f"  {record.outcome}: {record.scenario} port {record.port}: {record.detail}")
    if problems:
        print("FAIL: " + "; ".join(problems))
        print("forkproxy log (last lines):\n" + "\n".join(log.splitlines()[-20:]))
        return 1
    print("PASS: no unexplained failure, no corrupt byte, the cap held")
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cap", type=int, default=16, help="forkproxy -c")
    parser.add_argument("--clients", type=int, help="client threads (default: cap + 4)")
    parser.add_argument("--kill-interval", type=float, default=6.0, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    parser.add_argument(
        "--forkproxy",
        default=os.environ.get("FORKPROXY", str(Path(sys.executable).parent / "forkproxy")),
    )
    args = parser.parse_args(argv)
    if args.clients is None:
        args.clients = args.cap + 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as directory:
        return soak(args, Path(directory))


if __name__ == "__main__":
    sys.exit(main())
