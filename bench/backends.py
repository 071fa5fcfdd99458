"""The servers behind the proxies: a real nginx with a small static file, iperf3, an echo server.

Each is started fresh for one measurement on a free loopback port, in its own temp dir, and
stopped by its process group. Never starts a proxy.
"""

from __future__ import annotations

import math
import selectors
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import LOOPBACK, ProcessGroup, Registry, free_port
from bench.settings import Settings
from bench.tools import Tools

SMALL_FILE = "small.txt"
ECHO_PER_PROCESS = 15000


class BackendError(RuntimeError):
    """A backend did not start; the message says which and why."""


@dataclass(slots=True)
class Backend:
    kind: str
    port: int
    groups: list[ProcessGroup]

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def start_backend(
    kind: str, registry: Registry, workdir: Path, tools: Tools, settings: Settings, holds: int = 0
) -> Backend:
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "http":
        return _start_nginx(registry, workdir, tools, settings)
    if kind == "iperf3":
        return _start_iperf3(registry, workdir, tools)
    if kind == "echo":
        return _start_echo(registry, workdir, holds)
    raise ValueError(f"unknown backend kind {kind!r}")


def describe_backends(settings: Settings) -> dict[str, str]:
    """How each backend is run, for the results document."""
    return {
        "http": (
            f"nginx, worker_processes {settings.backend_workers}, keep-alive, access_log off, "
            f"sendfile, serving /{SMALL_FILE} ({settings.small_file_bytes} bytes)"
        ),
        "iperf3": "iperf3 --server on 127.0.0.1",
        "echo": (
            f"python -m bench.echo_server (epoll), one process per {ECHO_PER_PROCESS} "
            "connections held, sharing the port with SO_REUSEPORT"
        ),
    }


def stop_backend(registry: Registry, backend: Backend) -> None:
    for group in backend.groups:
        registry.stop(group)


def nginx_backend_config(workdir: Path, port: int, settings: Settings) -> str:
    """nginx serving one small static file over keep-alive, as a fast origin would."""
    return f"""\
daemon off;
master_process on;
worker_processes {settings.backend_workers};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 10000000;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    default_type text/plain;
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        root {workdir}/www;
    }}
}}
"""


def _start_nginx(registry: Registry, workdir: Path, tools: Tools, settings: Settings) -> Backend:
    if tools.nginx is None:
        raise BackendError(tools.missing_note("nginx"))
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    (www / SMALL_FILE).write_bytes(b"x" * (settings.small_file_bytes - 1) + b"\n")
    # nginx workers run as nobody when started as root: let them reach the file.
    for path in (workdir, www):
        path.chmod(0o755)
    (www / SMALL_FILE).chmod(0o644)
    port = free_port()
    config = workdir / "nginx.conf"
    config.write_text(nginx_backend_config(workdir, port, settings))
    group = registry.start(
        "nginx-backend",
        [tools.nginx, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")],
        workdir / "stderr.log",
    )
    return Backend("http", port, [group])


def _start_iperf3(registry: Registry, workdir: Path, tools: Tools) -> Backend:
    if tools.iperf3 is None:
        raise BackendError(tools.missing_note("iperf3"))
    port = free_port()
    group = registry.start(
        "iperf3-server",
        [tools.iperf3, "--server", "--bind", LOOPBACK, "--port", str(port)],
        workdir / "iperf3-server.log",
    )
    return Backend("iperf3", port, [group])


def _start_echo(registry: Registry, workdir: Path, holds: int) -> Backend:
    port = free_port()
    processes = max(1, math.ceil(holds / ECHO_PER_PROCESS))
    groups = [
        registry.start(
            f"echo-{index}",
            [sys.executable, "-m", "bench.echo_server", "--port", str(port)],
            workdir / f"echo-{index}.log",
            stdout_pipe=True,
        )
        for index in range(processes)
    ]
    for group in groups:
        if not _ready_line(group, timeout=10.0):
            log = group.log_tail()
            for started in groups:
                registry.stop(started)
            raise BackendError(f"echo server did not start: {log}")
    return Backend("echo", port, groups)


def _ready_line(group: ProcessGroup, timeout: float) -> bool:
    stdout = group.popen.stdout
    if stdout is None:
        return False
    with selectors.DefaultSelector() as selector:
        selector.register(stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return False
    line: str = stdout.readline()
    return line.strip() == "ready"
