"""System calls per churned connection: the proxy's running tree under `strace -c -f`.

Not timed. strace attaches to every process of the relay's tree (`-p` each, `-f` for all
their threads); then a plain client makes N connections one at a time (connect, one small
HTTP request with `Connection: close`, the answer read to EOF, close), and after each one
waits until the proxy holds no connected TCP socket any more, so each connection is
accepted, relayed and torn down on its own. strace's summary divided by N is the figure.
A second, shorter trace with no traffic records what the tree calls on its own (timers,
heartbeats), to judge that share. Never launches a proxy; signals only the strace it starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.backends import SMALL_FILE
from bench.loadbase import Extra, Load, LoadError, Metric, Target, Values
from bench.probes import Probe, http_probe
from bench.procs import LOOPBACK, ProcessGroup
from bench.proctree import tree_pids
from bench.settings import Settings
from bench.tools import Tools

ATTACH_TIMEOUT = 10.0
SETTLE_SECONDS = 0.5  # a socket set unchanged this long is the idle tree's
QUIET_TIMEOUT = 5.0
CLIENT_TIMEOUT = 5.0
# Untraced connections first, so one-time work (pools, lazy allocations) is not counted.
WARMUP_CONNECTIONS = 10
TCP_LISTEN = "0A"  # st in /proc/net/tcp


@dataclass(frozen=True, slots=True)
class Summary:
    """strace -c's table: calls and failed calls by system call name."""

    calls: dict[str, int]
    errors: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def parse_summary(text: str) -> Summary:
    """The rows of `strace -c` (% time, seconds, usecs/call, calls, [errors], syscall)."""
    calls: dict[str, int] = {}
    errors: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) not in (5, 6) or fields[-1] == "total" or not fields[3].isdigit():
            continue
        name = fields[-1]
        calls[name] = calls.get(name, 0) + int(fields[3])
        if len(fields) == 6:
            errors[name] = errors.get(name, 0) + int(fields[4])
    return Summary(calls, errors)


class SyscallCount(Load):
    """strace -c -f on the proxy's tree over N one-at-a-time HTTP connections (not timed)."""

    name = "syscalls"
    backend = "http"
    needs = ("nginx", "strace")
    proxies_only = True
    cpu_accounted = False
    metrics = (
        Metric(
            "syscalls_per_conn",
            "system calls per churned connection, 1 at a time",
            "calls",
            False,
            1,
            proxies_only=True,
        ),
    )

    def probe(self, tools: Tools, settings: Settings) -> Probe:
        return http_probe(f"/{SMALL_FILE}", settings.small_file_bytes)

    def seconds(self, settings: Settings) -> float:
        return 2.0 + settings.syscall_idle_seconds + settings.syscall_connections * 0.02

    def run(self, target: Target) -> tuple[Values, Extra]:
        settings = target.settings
        assert target.group is not None and target.tools.strace is not None
        pids = tree_pids(target.group.pid)
        for _ in range(WARMUP_CONNECTIONS):
            _one_connection(target.port, settings.small_file_bytes)
        quiet_sockets = _settled_sockets(pids)
        with _Trace(target, pids, "idle") as idle:
            time.sleep(settings.syscall_idle_seconds)  # what the tree does on its own
        with _Trace(target, pids, "connections") as traced:
            started = time.monotonic()
            for _ in range(settings.syscall_connections):
                _one_connection(target.port, settings.small_file_bytes)
                _wait_quiet(pids, quiet_sockets)
            traced_seconds = time.monotonic() - started
        count = settings.syscall_connections
        summary, idle_summary = traced.summary, idle.summary
        if summary.total == 0:
            raise LoadError("strace counted no system call")
        idle_rate = idle_summary.total / max(settings.syscall_idle_seconds, 1e-9)
        extra: Extra = {
            "connections": count,
            "processes": len(pids),
            "total_calls": summary.total,
            "calls": dict(sorted(summary.calls.items(), key=lambda item: -item[1])),
            "errors": summary.errors,
            "traced_seconds": round(traced_seconds, 3),
            "idle_seconds": settings.syscall_idle_seconds,
            "idle_calls": idle_summary.calls,
            # What the tree would have called with no traffic over the traced time, per
            # connection: included in the figure, shown to judge it.
            "idle_calls_per_connection": round(idle_rate * traced_seconds / count, 3),
        }
        return {"syscalls_per_conn": summary.total / count}, extra


class _Trace:
    """One `strace -c -f -p PID...` over the `with` block; `summary` once it has ended."""

    def __init__(self, target: Target, pids: list[int], label: str) -> None:
        assert target.tools.strace is not None
        self.target = target
        self.pids = pids
        self.output = target.workdir / f"strace-{label}.txt"
        argv = [target.tools.strace, "-c", "-f", "-o", str(self.output)]
        for pid in pids:
            argv += ["-p", str(pid)]
        self.argv = argv
        self.log = target.workdir / f"strace-{label}.log"
        self.group: ProcessGroup | None = None
        self.summary = Summary({}, {})

    def __enter__(self) -> _Trace:
        self.group = self.target.registry.start("strace", self.argv, self.log)
        deadline = time.monotonic() + ATTACH_TIMEOUT
        # strace says "Process N attached" once per -p on stderr; no other signal of it.
        while _text(self.log).count(" attached") < len(self.pids):
            if not self.group.alive() or time.monotonic() > deadline:
                tail = self.group.log_tail()
                self.target.registry.stop(self.group)
                raise LoadError(f"strace did not attach to {self.pids}: {tail}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        group = self.group
        assert group is not None
        # SIGINT: strace detaches from every process and writes its summary.
        with contextlib.suppress(ProcessLookupError):
            group.popen.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            group.popen.wait(timeout=ATTACH_TIMEOUT)
        self.target.registry.stop(group)
        if exc_info[0] is None:
            if not self.output.exists():
                raise LoadError(f"strace wrote no summary: {group.log_tail()}")
            # A tree that made no call at all gets an empty file, no table.
            self.summary = parse_summary(_text(self.output))


def _one_connection(port: int, body_bytes: int) -> None:
    request = f"GET /{SMALL_FILE} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection((LOOPBACK, port), timeout=CLIENT_TIMEOUT) as sock:
            sock.sendall(request.encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as error:
        raise LoadError(f"connection through the proxy failed: {error}") from error
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or len(body) != body_bytes:
        raise LoadError(f"unexpected answer {head[:40]!r} with {len(body)} body bytes")


def _settled_sockets(pids: list[int]) -> set[int]:
    """The tree's sockets once it holds no connected TCP socket and their set has not
    changed for SETTLE_SECONDS: listeners, unix sockets. (A worker that was still starting
    when the probe went through another one opens its loop's sockets a little later.)"""
    deadline = time.monotonic() + QUIET_TIMEOUT
    previous: set[int] = set()
    stable_since = time.monotonic()
    while True:
        sockets = _socket_inodes(pids)
        now = time.monotonic()
        if sockets != previous or sockets & _connected_tcp_inodes():
            previous, stable_since = sockets, now
        elif now - stable_since >= SETTLE_SECONDS:
            return sockets
        if now > deadline:
            raise LoadError("the proxy still held connections with no client")
        time.sleep(0.01)


def _wait_quiet(pids: list[int], quiet_sockets: set[int]) -> None:
    """Until every socket the connection made is closed (new sockets have new inodes)."""
    deadline = time.monotonic() + QUIET_TIMEOUT
    while not _socket_inodes(pids) <= quiet_sockets:
        if time.monotonic() > deadline:
            raise LoadError(f"the proxy kept a connection open {QUIET_TIMEOUT:g} s after its end")
        time.sleep(0.0005)


def _socket_inodes(pids: list[int]) -> set[int]:
    inodes: set[int] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def _connected_tcp_inodes() -> set[int]:
    """Inodes of every TCP socket that is not listening, from /proc/net/tcp and tcp6."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in _text(Path(table)).splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] != TCP_LISTEN:
                inodes.add(int(fields[9]))
    return inodes


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
