"""`python -m bench.metrics_overhead`: relay throughput with --metrics against without.

Serving metrics must cost the relay nothing measurable: workers only store
into their own scoreboard slot, and the master answers scrapes from its own loop. This
runs forkproxy twice per round, one variant after the other (the order alternates, so a
drift in the machine's speed falls on both alike), under the same bulk load: iperf3
pushing a fixed number of bytes in one stream through forkproxy to an iperf3 server. The
metrics variant is scraped all the while, far more often than Prometheus would
(--scrape-interval, default 0.25 s; Prometheus defaults to 15 s). It prints each round,
the medians and their ratio, the median of the per-round ratios (the figure to read: it
does not mind the machine's speed drifting during the run), and the machine it ran on.
It measures and never asserts. Loopback only; every process it starts is stopped by
process group.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def forkproxy_command() -> str:
    found = os.environ.get("FORKPROXY") or shutil.which("forkproxy")
    if found:
        return found
    return str(Path(sys.executable).parent / "forkproxy")


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def iperf3_server(iperf3: str, port: int, log: Path) -> Iterator[None]:
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [iperf3, "--server", "--bind", LOOPBACK, "--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, process, "iperf3 --server")
        yield
    finally:
        stop_group(process)


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with status {process.returncode}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not listen on port {port}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def forkproxy(
    command: str, workers: int, target_port: int, metrics_port: int | None, directory: Path
) -> Iterator[int]:
    """forkproxy on a fresh loopback port, ready (READY=1); yields the port."""
    port = free_port()
    notify_path = directory / f"notify-{time.monotonic_ns()}.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.1)
    argv = [command, "-w", str(workers), "--listen", f"{LOOPBACK}:{port}"]
    if metrics_port is not None:
        argv += ["--metrics", f"{LOOPBACK}:{metrics_port}"]
    argv.append(f"{LOOPBACK}:{target_port}")
    log_path = directory / f"forkproxy-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            stdin=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    break
            except TimeoutError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"forkproxy did not get ready ({' '.join(argv)}):\n"
                        + log_path.read_text(errors="replace")
                    ) from None
        yield port
    finally:
        stop_group(process)
        notify.close()
        notify_path.unlink()


class Scraper:
    """Scrapes /metrics every `interval` seconds from a thread, as Prometheus would."""

    def __init__(self, port: int, interval: float) -> None:
        self.url = f"http://{LOOPBACK}:{port}/metrics"
        self.interval = interval
        self.scrapes = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.last = b""

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            with urllib.request.urlopen(self.url, timeout=10) as response:
                self.last = response.read()
            self.scrapes += 1

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


def push(iperf3: str, port: int, size: str) -> float:
    """One iperf3 stream of `size` bytes through `port`; the receiver's Gbit/s."""
    argv = [iperf3, "--client", LOOPBACK, "--port", str(port), "--bytes", size, "--json"]
    done = subprocess.run(argv, capture_output=True, timeout=600)
    report = json.loads(done.stdout)
    if "error" in report:
        raise SystemExit(f"iperf3: {report['error']}")
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9


def relayed_bytes(scrape: bytes) -> float:
    for line in scrape.decode().splitlines():
        if line.startswith('forkproxy_relayed_bytes_total{direction="to_target"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def machine() -> str:
    versions = subprocess.run(
        [shutil.which("iperf3") or "iperf3", "--version"], capture_output=True, text=True
    ).stdout.splitlines()
    forkproxy_version = subprocess.run(
        [forkproxy_command(), "--version"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
        f"Linux {platform.release()}, Python {platform.python_version()}, "
        f"{forkproxy_version}, {versions[0] if versions else 'iperf3 ?'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_overhead", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of both variants (7)")
    parser.add_argument("--bytes", default="1G", help="bytes per run, iperf3 syntax (1G)")
    parser.add_argument("--workers", type=int, default=2, help="forkproxy --workers (2)")
    parser.add_argument(
        "--scrape-interval", type=float, default=0.25, help="seconds between scrapes (0.25)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    iperf3 = shutil.which("iperf3")
    if iperf3 is None:
        print("iperf3 is missing: apt-get install iperf3", file=sys.stderr)
        return 2
    command = forkproxy_command()
    results: dict[str, list[float]] = {"without": [], "with": []}
    scrapes = 0
    print(machine())
    print(f"{args.rounds} rounds of {args.bytes}B through forkproxy -w {args.workers}")
    with tempfile.TemporaryDirectory(prefix="fp-metrics-bench-") as temp:
        directory = Path(temp)
        backend_port = free_port()
        with iperf3_server(iperf3, backend_port, directory / "iperf3.log"):
            for round_number in range(args.rounds):
                order = ["without", "with"] if round_number % 2 == 0 else ["with", "without"]
                line = []
                for variant in order:
                    metrics_port = free_port() if variant == "with" else None
                    with forkproxy(
                        command, args.workers, backend_port, metrics_port, directory
                    ) as port:
                        if metrics_port is None:
                            gbit_s = push(iperf3, port, args.bytes)
                        else:
                            with Scraper(metrics_port, args.scrape_interval) as scraper:
                                gbit_s = push(iperf3, port, args.bytes)
                            scrapes += scraper.scrapes
                            if relayed_bytes(scraper.last) <= 0 and scraper.scrapes:
                                print("warning: scrapes showed no relayed bytes", file=sys.stderr)
                    results[variant].append(gbit_s)
                    line.append(f"{variant} metrics {gbit_s:6.2f} Gbit/s")
                print(f"round {round_number + 1}: " + ", ".join(line), flush=True)
    without = statistics.median(results["without"])
    with_metrics = statistics.median(results["with"])
    spread = {variant: (min(values), max(values)) for variant, values in results.items()}
    print(
        f"median without metrics {without:.2f} Gbit/s "
        f"(range {spread['without'][0]:.2f}-{spread['without'][1]:.2f})"
    )
    print(
        f"median with metrics    {with_metrics:.2f} Gbit/s "
        f"(range {spread['with'][0]:.2f}-{spread['with'][1]:.2f}; {scrapes} scrapes in all)"
    )
    print(f"ratio of the medians, with/without: {with_metrics / without:.3f}")
    # Each round's two runs are seconds apart, so their ratio is immune to the machine
    # drifting over the whole run; its median is the figure to read.
    paired = statistics.median(
        with_run / without_run
        for with_run, without_run in zip(results["with"], results["without"], strict=True)
    )
    print(f"median of the per-round ratios, with/without: {paired:.3f}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "bytes": args.bytes,
                    "workers": args.workers,
                    "scrape_interval": args.scrape_interval,
                    "gbit_s": results,
                    "ratio_of_medians": with_metrics / without,
                    "median_paired_ratio": paired,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
