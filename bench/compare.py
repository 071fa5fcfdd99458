"""`python -m bench.compare`: forkproxy side by side with systemd-socket-proxyd and the others.

Command line to `Settings`, the run, the printed tables, the JSON file (and with --plot the
chart) and the exit code: 0 when every measurement relayed, 1 when one failed or the chart
asked for could not be drawn, 2 when the run could not start.
Owns the cleanup: every process started is stopped by process group, Ctrl-C and SIGTERM
included. Loopback only. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import signal
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from types import FrameType

from bench import chart, report
from bench.contenders import CONTENDER_NAMES
from bench.procs import Registry
from bench.runner import Plan, Sample, document, make_plan, run_plan
from bench.settings import LOADS, SMOKE_CONTENDERS, SMOKE_LOADS, Settings, smoke
from bench.tools import REPO_ROOT, find_tools, loadavg

RESULTS_DIR = REPO_ROOT / "bench" / "results"


class Stop(Exception):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C so every process gets stopped."""


def parse(argv: list[str]) -> tuple[Settings, argparse.Namespace]:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="Interleaved loopback benchmark of forkproxy against systemd-socket-proxyd, "
        "HAProxy, the nginx stream module and no proxy at all.",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a few seconds, forkproxy vs direct only, for CI"
    )
    parser.add_argument("--rounds", type=int, help=f"rounds (default {defaults.rounds})")
    parser.add_argument(
        "--duration", type=float, help=f"seconds per timed load (default {defaults.duration:g})"
    )
    parser.add_argument("--only", help="comma-separated loads: " + ",".join(LOADS))
    parser.add_argument("--contenders", help="comma-separated: " + ",".join(CONTENDER_NAMES))
    parser.add_argument(
        "--forkproxy",
        metavar="PATH",
        help="forkproxy command (default: $FORKPROXY, PATH, then the venv)",
    )
    parser.add_argument(
        "--output", type=Path, help="results JSON (default bench/results/compare-<date>.json)"
    )
    parser.add_argument(
        "--nofile",
        type=int,
        default=defaults.nofile,
        help="RLIMIT_NOFILE every proxy is launched with (default %(default)s)",
    )
    parser.add_argument("--idle-connections", type=int, default=defaults.idle_connections)
    parser.add_argument(
        "--capacity-limit",
        type=int,
        default=defaults.capacity_limit,
        help="stop opening connections here (default %(default)s)",
    )
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=defaults.latency_rate,
        help="requests/s for the latency load (default %(default)g)",
    )
    parser.add_argument("--wrk-threads", type=int, default=defaults.wrk_threads)
    parser.add_argument("--wrk-connections", type=int, default=defaults.wrk_connections)
    parser.add_argument(
        "--haproxy-splice",
        choices=("auto", "force"),
        default=defaults.haproxy_splice,
        help="option splice-auto, or splice-request and splice-response (default %(default)s)",
    )
    parser.add_argument(
        "--backend-workers",
        type=int,
        default=defaults.backend_workers,
        help="nginx backend worker_processes (default %(default)s)",
    )
    parser.add_argument(
        "--syscall-connections",
        type=int,
        default=defaults.syscall_connections,
        help="connections counted under strace in the syscalls load (default %(default)s)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.svg",
        help="also draw the results as a chart (needs matplotlib: pip install -e '.[bench]')",
    )
    parser.add_argument(
        "--keep-temp", action="store_true", help="keep the per-measurement configs and logs"
    )
    args = parser.parse_args(argv)
    if args.plot is not None and (problem := chart.missing_matplotlib()):
        parser.exit(2, f"bench.compare: --plot: {problem}\n")
    loads = _names(args.only, LOADS, parser, "load") if args.only else None
    contenders = (
        _names(args.contenders, CONTENDER_NAMES, parser, "contender") if args.contenders else None
    )
    settings = replace(
        defaults,
        nofile=args.nofile,
        idle_connections=args.idle_connections,
        capacity_limit=args.capacity_limit,
        latency_rate=args.latency_rate,
        wrk_threads=args.wrk_threads,
        wrk_connections=args.wrk_connections,
        backend_workers=args.backend_workers,
        haproxy_splice=args.haproxy_splice,
        syscall_connections=args.syscall_connections,
    )
    if args.duration is not None:
        settings = replace(settings, duration=args.duration)
    if args.smoke:
        settings = replace(smoke(settings), loads=SMOKE_LOADS, contenders=SMOKE_CONTENDERS)
    if args.rounds is not None:
        settings = replace(settings, rounds=args.rounds)
    if loads is not None:
        settings = replace(settings, loads=loads)
    if contenders is not None:
        settings = replace(settings, contenders=contenders)
    if settings.rounds < 1 or settings.duration <= 0 or settings.syscall_connections < 1:
        parser.error(
            "--rounds and --syscall-connections must be at least 1 and --duration positive"
        )
    return settings, args


def _names(
    text: str, known: tuple[str, ...], parser: argparse.ArgumentParser, kind: str
) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def check_smoke(plan: Plan, settings: Settings) -> str | None:
    """Smoke must measure what it was asked to; a missing tool is a failure, not a skip."""
    missing = [f"{name}: {note}" for name, note in plan.skipped_contenders.items()]
    missing += [f"load {name}: {note}" for name, note in plan.skipped_loads.items()]
    if missing:
        return "smoke run cannot run everything it should: " + "; ".join(missing)
    return None


def print_sample(sample: Sample, done: int, total: int) -> None:
    if sample.ok:
        shown = ", ".join(f"{key} {value:,.2f}" for key, value in sample.values.items())
        cpu = f" (proxy CPU {sample.proxy_cpu_percent:.0f}%)" if sample.proxy_cpu_percent else ""
        print(
            f"[{done}/{total}] r{sample.round} {sample.load:<9} {sample.contender:<13} "
            f"{shown}{cpu}",
            flush=True,
        )
    else:
        print(
            f"[{done}/{total}] r{sample.round} {sample.load:<9} {sample.contender:<13} "
            f"FAILED: {sample.error}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    settings, args = parse(sys.argv[1:] if argv is None else argv)
    tools = find_tools(args.forkproxy)
    plan = make_plan(settings, tools)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if settings.smoke and (problem := check_smoke(plan, settings)):
        print(f"bench.compare: {problem}", file=sys.stderr)
        return 2
    if not plan.contenders or not plan.loads:
        print("bench.compare: nothing to run (no contender or no load available)", file=sys.stderr)
        return 2
    started = datetime.datetime.now().astimezone()
    # A smoke run's numbers are not results: keep them out of bench/results/.
    default_dir = Path(tempfile.gettempdir()) if settings.smoke else RESULTS_DIR
    prefix = "compare-smoke" if settings.smoke else "compare"
    output = args.output or default_dir / f"{prefix}-{started:%Y-%m-%dT%H%M%S}.json"
    print(
        f"{len(plan.contenders)} contenders × {len(plan.loads)} loads × {settings.rounds} rounds, "
        f"about {plan.estimate_seconds(settings) / 60:.1f} min; results to {output}",
        flush=True,
    )
    registry = Registry()
    workroot = Path(tempfile.mkdtemp(prefix="forkproxy-bench-"))
    workroot.chmod(0o755)  # nginx workers run as nobody when started as root
    samples: list[Sample] = []
    load_at_start = loadavg()
    complete = False
    previous = {
        signum: signal.signal(signum, _raise_stop) for signum in (signal.SIGTERM, signal.SIGHUP)
    }
    try:

        def on_sample(sample: Sample, done: int, total: int) -> None:
            samples.append(sample)
            print_sample(sample, done, total)

        run_plan(plan, settings, tools, registry, workroot, on_sample)
        complete = True
    except (KeyboardInterrupt, Stop):
        print("\nbench.compare: interrupted; stopping every process started", file=sys.stderr)
    finally:
        registry.stop_all()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if args.keep_temp:
            print(f"configs and logs kept in {workroot}", file=sys.stderr)
        else:
            shutil.rmtree(workroot, ignore_errors=True)
    doc = document(plan, settings, tools, samples, started, load_at_start, complete)
    report.write(doc, output)
    print()
    print(report.header(doc), end="\n\n")
    if samples:
        print(report.render_matrix(doc), end="\n\n")
        print(report.render_long(doc))
        if syscalls := report.render_syscalls(doc):
            print("\n" + syscalls)
    print(f"\nresults: {output}")
    drawn = True
    if args.plot is not None:
        try:
            chart.draw(doc, args.plot)
            print(f"chart: {args.plot}")
        except (chart.ChartError, OSError) as error:
            print(f"bench.compare: no chart: {error}", file=sys.stderr)
            drawn = False
    failed = report.failures(doc)
    for line in failed:
        print(f"bench.compare: failed: {line}", file=sys.stderr)
    if not complete:
        return 130
    return 1 if failed or not drawn else 0


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
