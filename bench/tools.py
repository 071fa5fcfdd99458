"""Facts about this machine that the numbers depend on: tool paths, versions, hardware.

Never starts a long-lived process: only short `--version` style queries.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FORKPROXY_ENV = "FORKPROXY"
# Forces forkproxy's pure-Python relay engine (the default is the compiled one, once built).
PYTHON_ENGINE = {"FORKPROXY_ENGINE": "python"}

# Debian's package that ships each tool, for the "not installed" notes.
APT_PACKAGES = {
    "wrk": "wrk",
    "iperf3": "iperf3",
    "nginx": "nginx",
    "haproxy": "haproxy",
    "nginx-stream-module": "libnginx-mod-stream",
    "systemd-socket-activate": "systemd",
    "systemd-socket-proxyd": "systemd",
    "prlimit": "util-linux",
    "strace": "strace",
}

NGINX_STREAM_MODULE_CANDIDATES = (
    "/usr/lib/nginx/modules/ngx_stream_module.so",
    "/usr/lib64/nginx/modules/ngx_stream_module.so",
)
SOCKET_PROXYD_CANDIDATES = (
    "/lib/systemd/systemd-socket-proxyd",
    "/usr/lib/systemd/systemd-socket-proxyd",
)


@dataclass(frozen=True, slots=True)
class Tools:
    """Absolute paths of the programs found; None for each one missing."""

    wrk: str | None
    iperf3: str | None
    nginx: str | None
    nginx_stream_module: str | None
    haproxy: str | None
    socket_activate: str | None
    socket_proxyd: str | None
    prlimit: str | None
    strace: str | None
    forkproxy: str | None

    def missing_note(self, field: str) -> str:
        package = APT_PACKAGES.get(field.replace("_", "-"), field)
        return f"{field.replace('_', '-')} not found (apt-get install {package})"


def find_forkproxy(explicit: str | None) -> str | None:
    """--forkproxy, then $FORKPROXY, then PATH, then the venv beside this interpreter/repo."""
    for candidate in (explicit, os.environ.get(FORKPROXY_ENV)):
        if candidate:
            found = shutil.which(candidate)
            return found if found else None
    for candidate in (
        shutil.which("forkproxy"),
        str(Path(sys.executable).parent / "forkproxy"),
        str(REPO_ROOT / ".venv" / "bin" / "forkproxy"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_tools(forkproxy: str | None) -> Tools:
    return Tools(
        wrk=shutil.which("wrk"),
        iperf3=shutil.which("iperf3"),
        nginx=shutil.which("nginx") or _first_executable(("/usr/sbin/nginx",)),
        nginx_stream_module=_first_file(NGINX_STREAM_MODULE_CANDIDATES),
        haproxy=shutil.which("haproxy") or _first_executable(("/usr/sbin/haproxy",)),
        socket_activate=shutil.which("systemd-socket-activate"),
        socket_proxyd=_first_executable(SOCKET_PROXYD_CANDIDATES),
        prlimit=shutil.which("prlimit"),
        strace=shutil.which("strace"),
        forkproxy=find_forkproxy(forkproxy),
    )


def versions(tools: Tools) -> dict[str, str]:
    """One line per tool, as the tool prints it."""
    queries: dict[str, list[str] | None] = {
        "wrk": [tools.wrk, "-v"] if tools.wrk else None,
        "iperf3": [tools.iperf3, "--version"] if tools.iperf3 else None,
        "nginx": [tools.nginx, "-v"] if tools.nginx else None,
        "haproxy": [tools.haproxy, "-v"] if tools.haproxy else None,
        "systemd-socket-proxyd": (
            [tools.socket_proxyd, "--version"] if tools.socket_proxyd else None
        ),
        "systemd-socket-activate": (
            [tools.socket_activate, "--version"] if tools.socket_activate else None
        ),
        "prlimit": [tools.prlimit, "--version"] if tools.prlimit else None,
        "strace": [tools.strace, "-V"] if tools.strace else None,
        "forkproxy": [tools.forkproxy, "--version"] if tools.forkproxy else None,
    }
    found = {name: _first_line(argv) if argv else "not found" for name, argv in queries.items()}
    if tools.forkproxy:
        # `--version` names the engine that runs, once there is more than one.
        found["forkproxy FORKPROXY_ENGINE=python"] = _first_line(
            [tools.forkproxy, "--version"], {**os.environ, **PYTHON_ENGINE}
        )
    found["nginx-stream-module"] = tools.nginx_stream_module or "not found"
    found["python"] = sys.version.split()[0]
    found["forkproxy-source"] = source_state()
    for package in ("uvloop",):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["libnginx-mod-stream"] = _dpkg_version("libnginx-mod-stream")
    return found


def machine() -> dict[str, object]:
    """Facts that change what the numbers mean: cores, kernel, CPU, memory, TCP settings."""
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "memory_kib": _meminfo_kib("MemTotal:"),
        "nofile_limit": _nofile(),
        "sysctl": {
            name: (_read(f"/proc/sys/{name.replace('.', '/')}") or "").strip()
            for name in (
                "net.core.somaxconn",
                "net.ipv4.ip_local_port_range",
                "net.ipv4.tcp_tw_reuse",
                "net.ipv4.tcp_congestion_control",
                "fs.pipe-max-size",
            )
        },
    }


def loadavg() -> list[float]:
    return [float(value) for value in (_read("/proc/loadavg") or "0 0 0").split()[:3]]


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat, for the machine's busy share."""
    fields = [int(value) for value in (_read("/proc/stat") or "cpu 0").split("\n")[0].split()[1:]]
    idle = sum(fields[3:5])  # idle, iowait
    return sum(fields) - idle, sum(fields)


def source_state() -> str:
    """The forkproxy checkout measured: commit and whether the tree had changes."""
    git = shutil.which("git")
    if git is None:
        return "unknown (no git)"
    head = subprocess.run(
        [git, "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    dirty = subprocess.run(
        [git, "-C", str(REPO_ROOT), "status", "--porcelain", "--", "forkproxy"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    commit = head.stdout.strip() if head.returncode == 0 else "no commit yet"
    return commit + (" with uncommitted changes in forkproxy/" if dirty.stdout.strip() else "")


def _first_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    text = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return text[0].strip() if text else f"unknown (exit {done.returncode})"


def _dpkg_version(package: str) -> str:
    if shutil.which("dpkg-query") is None:
        return "unknown"
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=10
    )
    return done.stdout.strip() if done.returncode == 0 else "not installed"


def _first_executable(paths: tuple[str, ...]) -> str | None:
    return next((path for path in paths if os.access(path, os.X_OK)), None)


def _first_file(paths: tuple[str, ...]) -> str | None:
    return next((path for path in paths if os.path.isfile(path)), None)


def _cpu_model() -> str:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _meminfo_kib(key: str) -> int:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def _nofile() -> list[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return [soft, hard]


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None
