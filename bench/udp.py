"""UDP request/response through forkproxy, socat and nginx's stream module, in one run.

    python -m bench.udp [--rounds 3] [--duration 5] [--sockets 32] [--size 64]
                        [--contenders LIST] [--forkproxy PATH] [--output FILE.json]

Every contender relays, on a fresh loopback port, to the same UDP echo target
(bench/udp_peers.py); the same load (one process, --sockets client sockets, each with one
request in flight) runs through each for --duration seconds. Rounds interleave the
contenders. For each: exchanges per second (a request and its reply), datagrams per
second through the proxy (two per exchange), and the CPU time of the contender's whole
process tree per datagram relayed (utime + stime from /proc, reaped children included:
bench/proctree.py), medians over the rounds. Requests without a reply within a second
are counted lost. Measures and never asserts; results are not kept in the repository.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.procs import LOOPBACK, ProcessGroup, Registry
from bench.proctree import tree_cpu
from bench.tools import REPO_ROOT, Tools, find_forkproxy, find_tools, machine, versions

READY_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    describe: str
    # (target port, listen port, workdir, tools) -> argv, or None when it cannot run here
    argv: Callable[[int, int, Path, Tools], list[str] | None]


def _forkproxy(options: list[str]) -> Callable[[int, int, Path, Tools], list[str] | None]:
    def argv(target: int, port: int, workdir: Path, tools: Tools) -> list[str] | None:
        if tools.socket_activate is None or tools.forkproxy is None:
            return None
        return [
            *(tools.socket_activate, "--datagram", "--listen", f"{LOOPBACK}:{port}"),
            *(tools.forkproxy, *options, f"udp:{LOOPBACK}:{target}"),
        ]

    return argv


def _socat(target: int, port: int, workdir: Path, tools: Tools) -> list[str] | None:
    socat = shutil.which("socat")
    if socat is None:
        return None
    return [socat, f"UDP4-RECVFROM:{port},bind={LOOPBACK},fork", f"UDP4:{LOOPBACK}:{target}"]


def _nginx(target: int, port: int, workdir: Path, tools: Tools) -> list[str] | None:
    if tools.nginx is None or tools.nginx_stream_module is None:
        return None
    config = workdir / "nginx.conf"
    config.write_text(f"""\
load_module {tools.nginx_stream_module};
daemon off;
master_process on;
worker_processes auto;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{
    worker_connections 4096;
}}
stream {{
    server {{
        listen {LOOPBACK}:{port} udp reuseport;
        proxy_pass {LOOPBACK}:{target};
        proxy_responses 1;
        proxy_timeout 10s;
    }}
}}
""")
    return [tools.nginx, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")]


CONTENDERS = (
    Contender("direct", "the load talks to the echo target itself: the ceiling", lambda *_: []),
    Contender(
        "forkproxy",
        "systemd-socket-activate --datagram -l 127.0.0.1:PORT forkproxy udp:TARGET "
        "(a session per client socket, kept: --datagram-timeout 30s)",
        _forkproxy([]),
    ),
    Contender(
        "forkproxy-replies-1",
        "the same with --datagram-replies=1: a session, and a socket at the target, per request",
        _forkproxy(["--datagram-replies=1"]),
    ),
    Contender(
        "socat",
        "socat UDP4-RECVFROM:PORT,bind=127.0.0.1,fork UDP4:TARGET: a process per request",
        _socat,
    ),
    Contender(
        "nginx-stream",
        "stream { listen PORT udp reuseport; proxy_pass TARGET; proxy_responses 1; }, "
        "worker_processes auto",
        _nginx,
    ),
)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def answered(port: int) -> bool:
    """Whether one probe datagram comes back through `port` (the first starts forkproxy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.5)
        probe.connect((LOOPBACK, port))
        try:
            probe.send(b"probe")
            return probe.recv(100) == b"probe"
        except (TimeoutError, ConnectionRefusedError):
            return False


def measure(
    contender: Contender,
    target: int,
    tools: Tools,
    registry: Registry,
    arguments: argparse.Namespace,
    workdir: Path,
) -> dict[str, float] | str:
    """One contender under the load once: its figures, or why it did not run."""
    port = target if contender.name == "direct" else free_udp_port()
    group: ProcessGroup | None = None
    argv = contender.argv(target, port, workdir, tools)
    if argv is None:
        return "not installed"
    if argv:
        group = registry.start(contender.name, argv, workdir / f"{contender.name}.log")
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not answered(port):
            if time.monotonic() > deadline or (group is not None and not group.alive()):
                return "did not answer: " + (group.log_tail() if group else "")
        before = tree_cpu(group.pid).seconds if group else 0.0
        load = subprocess.run(
            [sys.executable, "-m", "bench.udp_peers", "load", str(port), str(arguments.sockets)]
            + [str(arguments.duration), str(arguments.size)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=arguments.duration + 60,
            check=True,
        )
        cpu = (tree_cpu(group.pid).seconds - before) if group else 0.0
    finally:
        if group is not None:
            registry.stop(group)
    result = json.loads(load.stdout)
    exchanges = max(1, result["exchanges"])
    return {
        "exchanges_per_second": result["exchanges"] / result["seconds"],
        "datagrams_per_second": 2 * result["exchanges"] / result["seconds"],
        "cpu_us_per_datagram": cpu / (2 * exchanges) * 1e6,
        "cpu_seconds": cpu,
        "lost": result["lost"],
        "wrong": result["wrong"],
    }


def report(results: dict[str, list[dict[str, float] | str]], rounds: int) -> str:
    lines = [
        f"{'contender':<21}{'exchanges/s':>13}{'datagrams/s':>13}{'CPU us/datagram':>17}"
        f"{'lost':>7}   (medians of {rounds} rounds)"
    ]
    for name, runs in results.items():
        figures = [run for run in runs if isinstance(run, dict)]
        if not figures:
            lines.append(f"{name:<21}{'-':>13}  {runs[0] if runs else ''}")
            continue
        median = {key: statistics.median(run[key] for run in figures) for key in figures[0]}
        cpu = "-" if name == "direct" else f"{median['cpu_us_per_datagram']:.1f}"
        lines.append(
            f"{name:<21}{median['exchanges_per_second']:>13,.0f}"
            f"{median['datagrams_per_second']:>13,.0f}{cpu:>17}{int(median['lost']):>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.udp", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per run")
    parser.add_argument("--sockets", type=int, default=32, help="client sockets (in flight)")
    parser.add_argument("--size", type=int, default=64, help="request bytes (>= 8)")
    parser.add_argument("--contenders", default=",".join(c.name for c in CONTENDERS))
    parser.add_argument("--forkproxy", help="the forkproxy command (default: the venv's)")
    parser.add_argument("--output", type=Path, help="also write the figures as JSON")
    arguments = parser.parse_args(argv)
    chosen = [c for c in CONTENDERS if c.name in arguments.contenders.split(",")]
    tools = find_tools(find_forkproxy(arguments.forkproxy))
    for contender in CONTENDERS:
        if contender.name in arguments.contenders.split(","):
            print(f"{contender.name}: {contender.describe}")
    registry = Registry()
    results: dict[str, list[dict[str, float] | str]] = {c.name: [] for c in chosen}
    with tempfile.TemporaryDirectory(prefix="bench-udp-") as temporary:
        workdir = Path(temporary)
        echo = registry.start(
            "echo",
            [sys.executable, "-m", "bench.udp_peers", "echo"],
            workdir / "echo.log",
            cwd=REPO_ROOT,
            stdout_pipe=True,
        )
        try:
            assert echo.popen.stdout is not None
            target = int(echo.popen.stdout.readline().split()[1])
            for round_number in range(arguments.rounds):
                order = chosen if round_number % 2 == 0 else chosen[::-1]
                for contender in order:
                    run_dir = workdir / f"{contender.name}-{round_number}"
                    run_dir.mkdir()
                    outcome = measure(contender, target, tools, registry, arguments, run_dir)
                    results[contender.name].append(outcome)
                    print(f"round {round_number + 1}, {contender.name}: {outcome}", flush=True)
        finally:
            registry.stop_all()
    print()
    print(report(results, arguments.rounds))
    if arguments.output is not None:
        arguments.output.write_text(
            json.dumps(
                {
                    "settings": vars(arguments) | {"output": str(arguments.output)},
                    "machine": machine(),
                    "versions": versions(tools) | {"socat": shutil.which("socat") or "not found"},
                    "results": results,
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
