"""The proxies compared, each launched at its best on a fresh loopback port in front of a target.

Every proxy is launched under `prlimit --nofile=N:N` with the same N and the same connection
cap. socket-proxyd and forkproxy are launched exactly as users do, under
`systemd-socket-activate -l ADDR [-E VAR=VALUE] PROG [-c N] TARGET`; systemd-socket-activate
passes its child only the variables given with -E (and LISTEN_*), so a contender's
environment (FORKPROXY_ENGINE) goes there. Never measures, never picks a load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.procs import LOOPBACK, ProcessGroup, Registry, free_port
from bench.settings import Settings
from bench.tools import PYTHON_ENGINE, Tools


@dataclass(frozen=True, slots=True)
class Running:
    """A launched contender: where clients connect, and its process group (None for direct)."""

    port: int
    group: ProcessGroup | None


class Contender:
    name = ""

    def unavailable(self, tools: Tools) -> str | None:
        """None when it can run here, else the note saying what is missing."""
        raise NotImplementedError

    def describe(self, tools: Tools, settings: Settings) -> str:
        """How it is configured, one line, for the report."""
        raise NotImplementedError

    def launch(
        self, target: str, workdir: Path, registry: Registry, tools: Tools, settings: Settings
    ) -> Running:
        raise NotImplementedError

    @staticmethod
    def limited(tools: Tools, settings: Settings, argv: list[str]) -> list[str]:
        assert tools.prlimit is not None
        return [tools.prlimit, f"--nofile={settings.nofile}:{settings.nofile}", *argv]


class Direct(Contender):
    """No proxy: the client talks to the backend itself. The ceiling."""

    name = "direct"

    def unavailable(self, tools: Tools) -> str | None:
        return None

    def describe(self, tools: Tools, settings: Settings) -> str:
        return "client connects to the backend, no proxy"

    def launch(
        self, target: str, workdir: Path, registry: Registry, tools: Tools, settings: Settings
    ) -> Running:
        return Running(int(target.rsplit(":", 1)[1]), None)


class SocketActivated(Contender):
    """A program that takes `[-c N] TARGET` and a listening socket from systemd."""

    def __init__(
        self,
        name: str,
        workers: int | None = None,
        environment: dict[str, str] | None = None,
        access_log: bool = False,
    ) -> None:
        self.name = name
        self.workers = workers
        self.environment = dict(environment or {})
        self.access_log = access_log  # forkproxy --access-log to a file in the workdir

    def setenv(self) -> list[str]:
        """systemd-socket-activate's options that put `environment` in the child's."""
        return [f"--setenv={name}={value}" for name, value in self.environment.items()]

    def program(self, tools: Tools) -> list[str]:
        if self.name == "socket-proxyd":
            assert tools.socket_proxyd is not None
            return [tools.socket_proxyd]
        assert tools.forkproxy is not None
        return [tools.forkproxy] + (["-w", str(self.workers)] if self.workers else [])

    def unavailable(self, tools: Tools) -> str | None:
        for field in ("socket_activate", "prlimit"):
            if getattr(tools, field) is None:
                return tools.missing_note(field)
        if self.name == "socket-proxyd" and tools.socket_proxyd is None:
            return tools.missing_note("systemd-socket-proxyd")
        if self.name.startswith("forkproxy") and tools.forkproxy is None:
            return (
                "forkproxy command not found (pip install -e . in the venv, or pass "
                "--forkproxy PATH / set FORKPROXY)"
            )
        return None

    def describe(self, tools: Tools, settings: Settings) -> str:
        program = " ".join(
            Path(part).name if i == 0 else part for i, part in enumerate(self.program(tools))
        )
        workers = "" if self.workers else " (its default worker count: one per CPU)"
        if self.name == "socket-proxyd":
            workers = ""
        setenv = "".join(f"{option} " for option in self.setenv())
        if self.access_log:
            program += " --access-log=FILE"
        return (
            f"systemd-socket-activate -l 127.0.0.1:PORT {setenv}{program} "
            f"-c {settings.max_connections} TARGET{workers}; nofile {settings.nofile}"
        )

    def launch(
        self, target: str, workdir: Path, registry: Registry, tools: Tools, settings: Settings
    ) -> Running:
        assert tools.socket_activate is not None
        port = free_port()
        argv = [tools.socket_activate, "--listen", f"{LOOPBACK}:{port}", *self.setenv()]
        argv += self.program(tools)
        if self.access_log:
            argv.append(f"--access-log={workdir / (self.name + '-access.log')}")
        argv += ["-c", str(settings.max_connections), target]
        group = registry.start(self.name, self.limited(tools, settings, argv), workdir / "log")
        return Running(port, group)


# Splice pipes HAProxy may keep; each costs 2 fds that maxconn must leave room for. Only
# connections moving data hold one, so a few hundred cover 32 busy connections.
HAPROXY_MAXPIPES = 256
# fds HAProxy keeps for itself beyond connections and pipes (listeners, pollers, stats).
HAPROXY_SPARE_FDS = 40
# socket-proxyd grows its pipes to 256 KiB (F_SETPIPE_SZ); HAProxy gets the same.
PIPE_BYTES = 256 * 1024
SPLICE_OPTIONS = {
    "auto": ["option splice-auto"],
    "force": ["option splice-request", "option splice-response"],
}


class HAProxy(Contender):
    """HAProxy in TCP mode, splice(2) with 256 KiB pipes, a thread per CPU."""

    name = "haproxy"

    @staticmethod
    def maxconn(settings: Settings) -> int:
        """The cap, or what the fd limit backs: HAProxy refuses to start on a maxconn it
        cannot back (2 fds per connection plus 2 per pipe) instead of failing later."""
        backed = (settings.nofile - 2 * HAPROXY_MAXPIPES - HAPROXY_SPARE_FDS) // 2
        return min(settings.max_connections, backed)

    def unavailable(self, tools: Tools) -> str | None:
        for field in ("haproxy", "prlimit"):
            if getattr(tools, field) is None:
                return tools.missing_note(field)
        return None

    def describe(self, tools: Tools, settings: Settings) -> str:
        splice = ", ".join(SPLICE_OPTIONS[settings.haproxy_splice])
        return (
            f"mode tcp, {splice}, tune.pipesize {PIPE_BYTES}, nbthread "
            f"{settings.haproxy_threads}, maxconn {self.maxconn(settings)} (all the fd limit "
            f"backs), maxpipes {HAPROXY_MAXPIPES}, ulimit-n {settings.nofile}; "
            f"nofile {settings.nofile}"
        )

    def config(self, port: int, target: str, settings: Settings) -> str:
        # ulimit-n pins HAProxy to the limit it was launched with; without it HAProxy tries
        # to raise RLIMIT_NOFILE to fit maxconn (as root it may), and it would not be fair.
        splice = "\n    ".join(SPLICE_OPTIONS[settings.haproxy_splice])
        return f"""\
global
    maxconn {self.maxconn(settings)}
    maxpipes {HAPROXY_MAXPIPES}
    tune.pipesize {PIPE_BYTES}
    nbthread {settings.haproxy_threads}
    ulimit-n {settings.nofile}

defaults
    mode tcp
    {splice}
    maxconn {self.maxconn(settings)}
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend relay
    bind {LOOPBACK}:{port}
    default_backend origin

backend origin
    server origin {target}
"""

    def launch(
        self, target: str, workdir: Path, registry: Registry, tools: Tools, settings: Settings
    ) -> Running:
        assert tools.haproxy is not None
        port = free_port()
        config = workdir / "haproxy.cfg"
        config.write_text(self.config(port, target, settings))
        argv = [tools.haproxy, "-db", "-f", str(config)]
        group = registry.start(self.name, self.limited(tools, settings, argv), workdir / "log")
        return Running(port, group)


class NginxStream(Contender):
    """nginx's stream module (L4 proxy), one worker per CPU, each with its reuseport socket."""

    name = "nginx-stream"

    def unavailable(self, tools: Tools) -> str | None:
        for field in ("nginx", "nginx_stream_module", "prlimit"):
            if getattr(tools, field) is None:
                return tools.missing_note(field)
        return None

    def describe(self, tools: Tools, settings: Settings) -> str:
        return (
            "stream { listen reuseport backlog=4096; proxy_pass TARGET; }, worker_processes "
            f"auto, worker_connections {2 * settings.max_connections}; nofile {settings.nofile}"
        )

    def config(self, workdir: Path, port: int, target: str, module: str, settings: Settings) -> str:
        # worker_connections counts the client and the upstream connection: twice the cap.
        return f"""\
load_module {module};
daemon off;
master_process on;
worker_processes auto;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{
    worker_connections {2 * settings.max_connections};
}}
stream {{
    server {{
        listen {LOOPBACK}:{port} reuseport backlog=4096;
        proxy_pass {target};
        proxy_connect_timeout 5s;
        proxy_timeout 1h;
    }}
}}
"""

    def launch(
        self, target: str, workdir: Path, registry: Registry, tools: Tools, settings: Settings
    ) -> Running:
        assert tools.nginx is not None and tools.nginx_stream_module is not None
        port = free_port()
        config = workdir / "nginx.conf"
        config.write_text(self.config(workdir, port, target, tools.nginx_stream_module, settings))
        argv = [tools.nginx, "-p", str(workdir), "-c", str(config)]
        argv += ["-e", str(workdir / "error.log")]
        group = registry.start(self.name, self.limited(tools, settings, argv), workdir / "log")
        return Running(port, group)


def all_contenders() -> list[Contender]:
    """In report order. forkproxy-w1 is `-w 1`; forkproxy is its default worker count and
    engine (the compiled one where it was built); forkproxy-python forces the Python engine."""
    return [
        Direct(),
        SocketActivated("socket-proxyd"),
        SocketActivated("forkproxy-w1", workers=1),
        SocketActivated("forkproxy-w1-access-log", workers=1, access_log=True),
        SocketActivated("forkproxy-python", environment=PYTHON_ENGINE),
        SocketActivated("forkproxy"),
        HAProxy(),
        NginxStream(),
    ]


CONTENDER_NAMES = (
    "direct",
    "socket-proxyd",
    "forkproxy-w1",
    "forkproxy-w1-access-log",
    "forkproxy-python",
    "forkproxy",
    "haproxy",
    "nginx-stream",
)
