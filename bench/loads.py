"""The loads: what one measurement of one contender does, and which figures it yields.

Each load names its backend, its probe and its metrics, and runs one bounded measurement
against a port where a contender relays to that backend. Never launches a contender.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from bench.backends import SMALL_FILE
from bench.holding import FillResult, HolderPool
from bench.loadbase import (
    GIB,
    Cost,
    Extra,
    Load,
    LoadError,
    Metric,
    Target,
    Values,
    cpu_metric,
    run_client,
)
from bench.probes import (
    IPERF3_BUSY,
    IPERF3_BUSY_TIMEOUT,
    Probe,
    echo_probe,
    http_probe,
    iperf3_probe,
)
from bench.procs import LOOPBACK
from bench.proctree import tree_usage
from bench.settings import Settings
from bench.syscalls import SyscallCount
from bench.tools import Tools

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_report.lua"
MIB = 1024


class Bulk(Load):
    """One TCP stream as fast as it goes: iperf3's control and data connections, both relayed."""

    name = "bulk"
    backend = "iperf3"
    cost = Cost(
        cpu_metric("cpu_s_per_10gib", "CPU per 10 GiB relayed", "s", 2),
        "bytes",
        work_per_unit=10 * GIB,
    )
    metrics = (Metric("gbit_s", "bulk throughput, 1 stream", "Gbit/s", True, 2), cost.metric)
    needs = ("iperf3",)

    def probe(self, tools: Tools, settings: Settings) -> Probe:
        return iperf3_probe(tools)

    def run(self, target: Target) -> tuple[Values, Extra]:
        settings = target.settings
        assert target.tools.iperf3 is not None
        omit = 1 if settings.duration >= 3 else 0
        argv = [target.tools.iperf3, "--client", LOOPBACK, "--port", str(target.port), "--json"]
        argv += ["--time", f"{settings.duration:g}", "--omit", str(omit)]
        argv += ["--connect-timeout", "3000"]
        # The server may still be closing the probes' last test: it refuses at once.
        busy_deadline = time.monotonic() + IPERF3_BUSY_TIMEOUT
        while True:
            done = run_client(argv, settings.duration + omit + 20)
            try:
                report = json.loads(done.stdout)
            except json.JSONDecodeError as error:
                raise LoadError(f"iperf3 printed no JSON (exit {done.returncode})") from error
            if IPERF3_BUSY not in str(report.get("error")) or time.monotonic() > busy_deadline:
                break
            time.sleep(0.1)
        if "error" in report:
            raise LoadError(f"iperf3: {report['error']}")
        end = report["end"]
        received = end["sum_received"]
        # The omitted first second crossed the proxy too, inside the CPU window.
        omitted = sum(
            interval["sum"]["bytes"]
            for interval in report.get("intervals", [])
            if interval["sum"].get("omitted")
        )
        return (
            {"gbit_s": received["bits_per_second"] / 1e9},
            {
                "bytes": received["bytes"],
                "bytes_relayed": end.get("sum_sent", {}).get("bytes", received["bytes"]) + omitted,
                "bytes_omitted": omitted,
                "seconds": received["seconds"],
                "retransmits": end.get("sum_sent", {}).get("retransmits"),
                "cpu_utilization_percent": end.get("cpu_utilization_percent"),
            },
        )

    def work(self, values: Values, extra: Extra) -> float | None:
        relayed = extra.get("bytes_relayed")
        return float(relayed) if isinstance(relayed, int | float) else None


class Requests(Load):
    """wrk against a real nginx serving a small static file, as fast as it goes."""

    backend = "http"
    needs = ("wrk", "nginx")
    close_each = False

    def probe(self, tools: Tools, settings: Settings) -> Probe:
        return http_probe(f"/{SMALL_FILE}", settings.small_file_bytes)

    def run(self, target: Target) -> tuple[Values, Extra]:
        settings = target.settings
        assert target.tools.wrk is not None
        seconds = max(1, math.ceil(settings.duration))
        argv = [target.tools.wrk, f"--threads={settings.wrk_threads}"]
        argv += [f"--connections={settings.wrk_connections}", f"--duration={seconds}s"]
        argv += [f"--timeout={settings.wrk_timeout:g}s", f"--script={WRK_SCRIPT}"]
        if self.close_each:
            argv += ["--header=Connection: close"]
        argv += [f"http://{LOOPBACK}:{target.port}/{SMALL_FILE}"]
        done = run_client(argv, seconds + settings.wrk_timeout + 20)
        lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH-JSON ")]
        if done.returncode != 0 or not lines:
            raise LoadError(f"wrk exit {done.returncode}: {done.stderr.strip()[:200]}")
        report = json.loads(lines[-1].removeprefix("BENCH-JSON "))
        if report["requests"] == 0:
            raise LoadError(f"wrk completed no request: {report}")
        errors = sum(report[key] for key in report if key.endswith("errors") or key == "timeouts")
        rate = report["requests"] / (report["duration_us"] / 1e6)
        return {self.metrics[0].key: rate}, {**report, "errors_total": errors}

    def work(self, values: Values, extra: Extra) -> float | None:
        # Requests answered; with Connection: close each is one whole connection. wrk's
        # failed attempts cost the proxy too and are not counted (errors_total says how many).
        requests = extra.get("requests")
        return float(requests) if isinstance(requests, int | float) else None


class KeepAlive(Requests):
    """wrk: GETs of a small static file from a real nginx over 32 keep-alive connections."""

    name = "keepalive"
    cost = Cost(
        cpu_metric("cpu_us_per_request", "CPU per keep-alive request", "µs", 1),
        "requests",
        cpu_scale=1e6,
    )
    metrics = (Metric("req_s", "keep-alive HTTP requests", "req/s", True), cost.metric)


class Churn(Requests):
    """As keep-alive, but `Connection: close`: every request is a new relayed connection."""

    name = "churn"
    close_each = True
    cost = Cost(
        cpu_metric("cpu_us_per_conn", "CPU per churned connection", "µs", 1),
        "connections",
        cpu_scale=1e6,
    )
    metrics = (Metric("conn_s", "connection churn (1 req/conn)", "conn/s", True), cost.metric)


class Latency(Load):
    """bench.paced at a fixed moderate rate, open loop, over keep-alive connections."""

    name = "latency"
    backend = "http"
    needs = ("nginx",)
    metrics = (
        Metric("p50_us", "latency p50 at fixed rate", "µs", False),
        Metric("p99_us", "latency p99 at fixed rate", "µs", False),
    )

    def probe(self, tools: Tools, settings: Settings) -> Probe:
        return http_probe(f"/{SMALL_FILE}", settings.small_file_bytes)

    def seconds(self, settings: Settings) -> float:
        return settings.duration + settings.latency_warmup + 1.0

    def run(self, target: Target) -> tuple[Values, Extra]:
        settings = target.settings
        argv = [sys.executable, "-m", "bench.paced", "--port", str(target.port)]
        argv += ["--path", f"/{SMALL_FILE}", "--rate", f"{settings.latency_rate:g}"]
        argv += ["--duration", f"{settings.duration:g}", "--warmup", f"{settings.latency_warmup:g}"]
        argv += ["--connections", str(settings.latency_connections)]
        done = run_client(argv, settings.duration + settings.latency_warmup + 30)
        try:
            report = json.loads(done.stdout)
        except json.JSONDecodeError as error:
            raise LoadError(f"bench.paced exit {done.returncode}: {done.stderr[-300:]}") from error
        if report.get("errors") or not report.get("recorded"):
            raise LoadError(f"bench.paced: {report.get('errors') or 'nothing recorded'}")
        return {"p50_us": report["p50_us"], "p99_us": report["p99_us"]}, report


class Idle(Load):
    """RSS of the whole proxy process tree while it holds N idle, relayed connections.

    RSS counts pages shared by forked workers once per process, as the idle-memory target does;
    PSS divides them among the sharers, so it is the memory the tree really costs.
    """

    name = "idle"
    backend = "echo"
    proxies_only = True
    metrics = (
        Metric("rss_mib", "RSS, idle conns held (tree)", "MiB", False, 1),
        Metric("pss_mib", "PSS, idle conns held (tree)", "MiB", False, 1),
        Metric("held", "idle conns held", "conns", True),
        Metric("rss_at_target_mib", "RSS extrapolated to target", "MiB", False, 1),
    )

    def probe(self, tools: Tools, settings: Settings) -> Probe:
        return echo_probe

    def seconds(self, settings: Settings) -> float:
        return 2.0 + settings.idle_connections / 5000

    def holds(self, settings: Settings) -> int:
        return settings.idle_connections

    def run(self, target: Target) -> tuple[Values, Extra]:
        settings = target.settings
        assert target.group is not None
        before = tree_usage(target.group.pid)
        pool = HolderPool(target.registry, target.workdir, target.port, settings.idle_connections)
        try:
            fill = pool.fill(
                settings.idle_connections,
                settings.open_batch,
                settings.open_batch_timeout,
                time.monotonic() + settings.hold_timeout,
            )
            held, verify_errors = pool.verify(settings.open_batch_timeout * 2)
            during = tree_usage(target.group.pid)
        finally:
            pool.stop()
        if held == 0:
            raise LoadError(f"no connection held: {dict(fill.errors)}")
        per_connection_kib = (during.rss_kib - before.rss_kib) / held
        at_target_kib = before.rss_kib + per_connection_kib * settings.idle_connections
        values = {
            "rss_mib": during.rss_kib / MIB,
            "pss_mib": during.pss_kib / MIB,
            "held": float(held),
            "rss_at_target_mib": at_target_kib / MIB,
        }
        extra: Extra = {
            "target": settings.idle_connections,
            "rss_kib_before": before.rss_kib,
            "rss_kib_held": during.rss_kib,
            "pss_kib_before": before.pss_kib,
            "pss_kib_held": during.pss_kib,
            "processes": during.processes,
            "rss_kib_per_connection": per_connection_kib,
            "fill": _fill_extra(fill),
            "verify_errors": dict(verify_errors),
        }
        return values, extra


class Capacity(Load):
    """How many relayed connections the proxy holds under the same RLIMIT_NOFILE."""

    name = "capacity"
    backend = "echo"
    proxies_only = True
    metrics = (Metric("held", "max concurrent conns held", "conns", True),)

    def probe(self, tools: Tools, settings: Settings) -> Probe:
        return echo_probe

    def seconds(self, settings: Settings) -> float:
        return 3.0 + settings.capacity_limit / 3000

    def holds(self, settings: Settings) -> int:
        return settings.capacity_limit

    def run(self, target: Target) -> tuple[Values, Extra]:
        settings = target.settings
        assert target.group is not None
        pool = HolderPool(target.registry, target.workdir, target.port, settings.capacity_limit)
        try:
            fill = pool.fill(
                settings.capacity_limit,
                settings.open_batch,
                settings.open_batch_timeout,
                time.monotonic() + settings.hold_timeout,
            )
            held, verify_errors = pool.verify(settings.open_batch_timeout * 2)
            during = tree_usage(target.group.pid)
        finally:
            pool.stop()
        extra: Extra = {
            "limit": settings.capacity_limit,
            "reached_limit": held >= settings.capacity_limit,
            "nofile": settings.nofile,
            "rss_kib_held": during.rss_kib,
            "processes": during.processes,
            "fill": _fill_extra(fill),
            "verify_errors": dict(verify_errors),
        }
        return {"held": float(held)}, extra


def all_loads() -> list[Load]:
    return [Bulk(), KeepAlive(), Churn(), Latency(), Idle(), Capacity(), SyscallCount()]


def _fill_extra(fill: FillResult) -> Extra:
    return {
        "held_after_fill": fill.held,
        "attempted": fill.attempted,
        "failed": fill.failed,
        "errors": dict(fill.errors),
        "stop_reason": fill.stop_reason,
        "seconds": round(fill.seconds, 2),
    }
