"""`python -m bench.pipe_cost`: CPU per GiB relayed by --pipe-size, beside
systemd-socket-proxyd (how the default pipe size was chosen).

One iperf3 stream of a fixed size crosses each contender in turn, interleaved, for several
rounds; for each it reports the proxy's CPU seconds (user + system, all its processes) per
GiB and the stream's Gbit/s. On a 2-core machine the single-stream rate is noisy, because
iperf3's client and server share the cores with the proxy; CPU per byte is the steadier
figure, and what a proxy leaves the rest of the machine. Loopback only; measures and never
asserts.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import time

from bench.procs import free_port
from bench.proctree import tree_usage
from bench.tools import find_forkproxy

GIB = 1 << 30
SOCKET_PROXYD = "/lib/systemd/systemd-socket-proxyd"


def _wait_served(port: int, timeout: float = 10.0) -> None:
    """Connect until the proxy listens, then wait until it has dealt with that probe: it
    closes it once the upstream refuses. (Starting iperf3 sooner, the probe could reach
    it and be taken for the one test a one-off server runs.)"""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # no readiness signal to wait on from outside the proxy
    with probe:
        try:
            probe.recv(1)  # EOF or a reset: the proxy closed it
        except ConnectionResetError:
            pass


def _one_stream(proxy_argv: list[str], gib: int) -> tuple[float, float]:
    """(CPU seconds per GiB, Gbit/s) of one iperf3 stream through the proxy."""
    target_port, listen_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    proxy = subprocess.Popen(
        [arg.replace("{listen}", str(listen_port)) for arg in proxy_argv]
        + [f"127.0.0.1:{target_port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    server: subprocess.Popen[str] | None = None
    try:
        _wait_served(listen_port)
        server = subprocess.Popen(
            ["iperf3", "--server", "--one-off", "--forceflush"]
            + ["--bind", "127.0.0.1", "--port", str(target_port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert server.stdout is not None
        # iperf3 prints "Server listening on PORT" once it accepts.
        while "listening" not in (line := server.stdout.readline()):
            if not line:
                raise RuntimeError(f"iperf3 --server on port {target_port} exited")
        before = tree_usage(proxy.pid).cpu_seconds
        result = subprocess.run(
            ["iperf3", "--client", "127.0.0.1", "--port", str(listen_port), "--bytes", f"{gib}G"]
            + ["--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        after = tree_usage(proxy.pid).cpu_seconds
        report = json.loads(result.stdout)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        return (after - before) / gib, report["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        os.killpg(proxy.pid, signal.SIGTERM)
        proxy.wait(timeout=20)
        if server is not None:
            server.kill()
            server.communicate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipe_cost", description=__doc__)
    parser.add_argument("--sizes", default="64K,256K,1M", help="comma-separated --pipe-size values")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gib", type=int, default=8, help="GiB per stream (default 8)")
    parser.add_argument("--forkproxy", metavar="PATH", help="forkproxy command")
    args = parser.parse_args(argv)
    forkproxy = find_forkproxy(args.forkproxy)
    if forkproxy is None:
        parser.error("forkproxy command not found (pip install -e ., or --forkproxy PATH)")
    contenders: dict[str, list[str]] = {
        f"forkproxy --pipe-size={size}": [
            forkproxy,
            "-w",
            "1",
            f"--pipe-size={size}",
            "--listen=127.0.0.1:{listen}",
        ]
        for size in args.sizes.split(",")
    }
    if os.path.exists(SOCKET_PROXYD):
        contenders["systemd-socket-proxyd"] = [
            "systemd-socket-activate",
            "--listen=127.0.0.1:{listen}",
            SOCKET_PROXYD,
        ]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for round_number in range(1, args.rounds + 1):
        for name, argv_ in contenders.items():
            cpu, gbit = _one_stream(argv_, args.gib)
            results[name].append((cpu, gbit))
            print(f"round {round_number} {name}: {cpu:.3f} CPU s/GiB, {gbit:.2f} Gbit/s")
    print(f"\nmedians of {args.rounds} rounds, {args.gib} GiB each:")
    print("| contender | CPU s/GiB (min … max) | Gbit/s (min … max) |")
    print("| --- | ---: | ---: |")
    for name, samples in results.items():
        cpus = [cpu for cpu, _ in samples]
        rates = [gbit for _, gbit in samples]
        print(
            f"| {name} | {statistics.median(cpus):.3f} ({min(cpus):.3f} … {max(cpus):.3f}) "
            f"| {statistics.median(rates):.2f} ({min(rates):.2f} … {max(rates):.2f}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
