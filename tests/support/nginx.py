"""A real nginx as a test backend: generated config, own temp dir, stopped by its pid.

`run_nginx()` starts /usr/sbin/nginx in the foreground (``daemon off``, ``master_process
off``: one process, so its pid is all there is to stop) with a config written into a fresh
temp dir that also holds the pid file, the logs and every temp path, so it works as root
and as any other user and never touches /etc/nginx or /var. It listens where the test
says (``127.0.0.1:PORT``, ``[::1]:PORT`` or ``unix:/path``; port 0 picks a free one) as
an HTTP server with a fixed body or a directory of files (and, for the paths
``statuses`` names, a fixed status: ``{"/health": 503}``), or as a stream server that
answers every connection with a fixed body. With ``proxy_protocol=True`` the listener
expects a PROXY header, and the JSON access log records ``$proxy_protocol_addr``,
``$proxy_protocol_port`` and friends next to ``$remote_addr``; `Nginx.wait_for_access_log`
reads them back parsed.

Readiness is nginx's pid file (written only once every listener is bound and listening)
followed by a connect that succeeds, to a private unix socket that the same nginx opens
with its access log off, so no probe ever shows up in the test's access log. Stopping is
SIGTERM to the pid, then SIGKILL to its process group (its own session) after a grace
deadline; the temp dir is removed either way. The `nginx_factory` fixture does the same
for any number of servers per test.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

__all__ = [
    "NGINX_BINARY",
    "NGINX_MODULES",
    "AccessLogEntry",
    "HttpResponse",
    "Nginx",
    "NginxError",
    "NginxFactory",
    "nginx_available",
    "nginx_factory",
    "read_to_eof",
    "require_nginx",
    "run_nginx",
]

NGINX_BINARY = Path("/usr/sbin/nginx")
NGINX_MODULES = Path("/usr/lib/nginx/modules")
DEFAULT_BODY = b"hello from nginx\n"
_READY_SOCKET = "ready.sock"
_LOG_FORMAT = "forkproxy_test"
_FREE_PORT_ATTEMPTS = 5
_POLL_INTERVAL = 0.005

# Fields of one access log line: variable name to JSON key. $request only exists in http.
_COMMON_FIELDS = (
    "remote_addr",
    "remote_port",
    "server_addr",
    "server_port",
    "proxy_protocol_addr",
    "proxy_protocol_port",
    "proxy_protocol_server_addr",
    "proxy_protocol_server_port",
    "status",
    "bytes_sent",
    "connection",
)
_HTTP_FIELDS = (*_COMMON_FIELDS, "request")

Mode = Literal["http", "stream"]


class NginxError(RuntimeError):
    """nginx did not start, or did not stop; the message carries its error log."""


@dataclass(frozen=True, slots=True)
class AccessLogEntry:
    """One access log line. Empty nginx variables are None; ports are ints.

    ``remote_addr`` is the socket's peer (``unix:`` for a unix listener), and the
    ``proxy_protocol_*`` fields are what the PROXY header said (None without one, or for
    v1 UNKNOWN and v2 LOCAL). ``request`` is None in stream mode.
    """

    remote_addr: str | None
    remote_port: int | None
    server_addr: str | None
    server_port: int | None
    proxy_protocol_addr: str | None
    proxy_protocol_port: int | None
    proxy_protocol_server_addr: str | None
    proxy_protocol_server_port: int | None
    status: int | None
    bytes_sent: int | None
    connection: int | None
    request: str | None
    raw: str = field(repr=False, compare=False)

    @property
    def proxy_protocol_peer(self) -> str:
        """``$proxy_protocol_addr:$proxy_protocol_port`` as nginx would print it."""
        return f"{self.proxy_protocol_addr or ''}:{self.proxy_protocol_port or ''}"

    @classmethod
    def parse(cls, line: str) -> AccessLogEntry:
        values: dict[str, Any] = json.loads(line)

        def text(name: str) -> str | None:
            value = values.get(name)
            return value if value else None

        def number(name: str) -> int | None:
            value = text(name)
            return int(value) if value is not None else None

        return cls(
            remote_addr=text("remote_addr"),
            remote_port=number("remote_port"),
            server_addr=text("server_addr"),
            server_port=number("server_port"),
            proxy_protocol_addr=text("proxy_protocol_addr"),
            proxy_protocol_port=number("proxy_protocol_port"),
            proxy_protocol_server_addr=text("proxy_protocol_server_addr"),
            proxy_protocol_server_port=number("proxy_protocol_server_port"),
            status=number("status"),
            bytes_sent=number("bytes_sent"),
            connection=number("connection"),
            request=text("request"),
            raw=line,
        )


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Nginx:
    """A running nginx started by `run_nginx`; the test's handle on it.

    ``address`` is what to pass to ``socket.connect``: ``(host, port)`` or a unix path;
    ``family`` the matching address family. ``listen`` is the nginx listen spec used.
    """

    process: subprocess.Popen[bytes]
    directory: Path
    listen: str
    family: socket.AddressFamily
    address: tuple[str, int] | str
    mode: Mode
    proxy_protocol: bool
    access_log: Path
    error_log: Path
    config: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int | None:
        return self.address[1] if isinstance(self.address, tuple) else None

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A blocking socket connected to the listener, with ``timeout`` set."""
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.address)
        except BaseException:
            sock.close()
            raise
        return sock

    def exchange(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Connect, send ``data`` in one ``sendall``, return all nginx sends until EOF."""
        with self.connect(timeout) as sock:
            if data:
                sock.sendall(data)
            return read_to_eof(sock)

    def get(self, path: str = "/", *, prefix: bytes = b"", timeout: float = 5.0) -> HttpResponse:
        """An HTTP/1.0 GET of ``path``; ``prefix`` (a PROXY header, say) goes first, in
        the same send as the request."""
        request = f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode("ascii")
        return _parse_http_response(self.exchange(prefix + request, timeout))

    def access_log_entries(self) -> list[AccessLogEntry]:
        """Every whole line of the access log so far, parsed."""
        try:
            text = self.access_log.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        lines = text.split("\n")[:-1]  # a line without its newline is still being written
        return [AccessLogEntry.parse(line) for line in lines if line]

    def wait_for_access_log(self, count: int = 1, timeout: float = 5.0) -> list[AccessLogEntry]:
        """The access log once it holds at least ``count`` entries; NginxError after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.access_log_entries()
            if len(entries) >= count:
                return entries
            if time.monotonic() >= deadline or self.process.poll() is not None:
                raise NginxError(
                    f"nginx {self.listen}: {len(entries)} of {count} access log lines after "
                    f"{timeout}s\n{self.error_log_text()}"
                )
            time.sleep(_POLL_INTERVAL)  # bounded by the deadline above

    def error_log_text(self) -> str:
        try:
            return self.error_log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL to its group after ``timeout`` seconds; reap. Idempotent."""
        _stop_process(self.process, timeout)


@contextlib.contextmanager
def run_nginx(
    listen: str = "127.0.0.1:0",
    *,
    proxy_protocol: bool = False,
    body: bytes = DEFAULT_BODY,
    root: Path | None = None,
    mode: Mode = "http",
    startup_timeout: float = 10.0,
    binary: Path = NGINX_BINARY,
    statuses: Mapping[str, int] | None = None,
) -> Iterator[Nginx]:
    """Run nginx for the ``with`` block and stop it after.

    ``listen``: ``HOST:PORT`` (``127.0.0.1:0``, ``[::1]:0``; port 0 picks a free port and
    retries if another process takes it first), ``unix:/path`` or ``unix:`` for a socket
    in nginx's temp dir. ``mode="http"`` serves ``body`` for every path, or the files
    under ``root`` when given; ``mode="stream"`` sends ``body`` on every connection and
    closes it. ``proxy_protocol`` adds ``proxy_protocol`` to the listen directive.
    ``statuses``: in http mode, paths answered with a fixed status instead.
    """
    require_nginx(binary, stream=mode == "stream")
    if mode == "stream" and root is not None:
        raise ValueError("root is for mode='http'; stream mode only sends body")
    picks_port = _picks_port(listen)
    attempts = _FREE_PORT_ATTEMPTS if picks_port else 1
    for attempt in range(1, attempts + 1):
        directory = Path(tempfile.mkdtemp(prefix="fp-nginx-"))
        try:
            nginx = _start(
                directory,
                listen,
                proxy_protocol,
                body,
                root,
                mode,
                startup_timeout,
                binary,
                dict(statuses or {}),
            )
        except _PortTaken as taken:
            shutil.rmtree(directory, ignore_errors=True)
            if not picks_port:
                message = f"nginx cannot listen on {listen!r}: Address already in use"
                raise NginxError(f"{message}\n{taken}") from None
            if attempt == attempts:
                message = f"nginx found no free port for {listen!r} in {attempts} tries"
                raise NginxError(f"{message}\n{taken}") from None
            continue
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        break
    try:
        yield nginx
    finally:
        try:
            nginx.stop()
        finally:
            if isinstance(nginx.address, str) and not nginx.address.startswith(str(directory)):
                _unlink_socket(Path(nginx.address))
            shutil.rmtree(directory, ignore_errors=True)


class NginxFactory:
    """Starts nginx servers (`run_nginx` arguments) and stops them all on `close`."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def __call__(
        self,
        listen: str = "127.0.0.1:0",
        *,
        proxy_protocol: bool = False,
        body: bytes = DEFAULT_BODY,
        root: Path | None = None,
        mode: Mode = "http",
        startup_timeout: float = 10.0,
        statuses: Mapping[str, int] | None = None,
    ) -> Nginx:
        return self._stack.enter_context(
            run_nginx(
                listen,
                proxy_protocol=proxy_protocol,
                body=body,
                root=root,
                mode=mode,
                startup_timeout=startup_timeout,
                statuses=statuses,
            )
        )

    def close(self) -> None:
        self._stack.close()


@pytest.fixture
def nginx_factory() -> Iterator[NginxFactory]:
    """``nginx_factory(listen, proxy_protocol=..., ...) -> Nginx``; all stopped at teardown."""
    factory = NginxFactory()
    try:
        yield factory
    finally:
        factory.close()


def nginx_available(binary: Path = NGINX_BINARY, *, stream: bool = False) -> bool:
    """Whether nginx (and, with ``stream``, its stream module) is installed."""
    if stream and not (NGINX_MODULES / "ngx_stream_module.so").is_file():
        return False
    return os.access(binary, os.X_OK)


def require_nginx(binary: Path = NGINX_BINARY, *, stream: bool = False) -> None:
    """Skip the test when nginx is not installed; under CI (``$CI`` set), fail instead."""
    if nginx_available(binary, stream=stream):
        return
    message = f"{binary} or its stream module is missing"
    message += ": apt-get install nginx libnginx-mod-stream"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class _PortTaken(Exception):
    pass


def _picks_port(listen: str) -> bool:
    return not listen.startswith("unix:") and listen.rsplit(":", 1)[-1] == "0"


def _resolve_listen(
    listen: str, directory: Path
) -> tuple[str, socket.AddressFamily, tuple[str, int] | str]:
    """The listen spec for nginx, the family, and the address to connect to."""
    if listen.startswith("unix:"):
        path = listen[len("unix:") :] or str(directory / "nginx.sock")
        if not path.startswith("/"):
            raise ValueError(f"unix listen path must be absolute: {listen!r}")
        return f"unix:{path}", socket.AF_UNIX, path
    host, colon, port_text = listen.rpartition(":")
    if not colon or not port_text.isdigit():
        raise ValueError(f"listen must be HOST:PORT, [V6]:PORT or unix:PATH: {listen!r}")
    family = socket.AF_INET
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        family = socket.AF_INET6
    try:
        socket.inet_pton(family, host)  # numeric only: nothing here resolves names
    except OSError:
        raise ValueError(f"listen host must be a numeric address: {listen!r}") from None
    port = int(port_text)
    if port == 0:
        port = _free_port(family, host)
    spec = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    return spec, family, (host, port)


def _free_port(family: socket.AddressFamily, host: str) -> int:
    # Racy by nature (the port is free now, not when nginx binds it): run_nginx retries.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _quote(value: str) -> str:
    """A double-quoted nginx config string that stands for ``value`` literally."""
    if any(char in value for char in '$"\\\0') or not value.isprintable():
        raise ValueError(f"cannot put {value!r} into an nginx config literally")
    return f'"{value}"'


def _log_format(fields: tuple[str, ...]) -> str:
    members = ",".join(f'"{name}":"${name}"' for name in fields)
    return f"log_format {_LOG_FORMAT} escape=json '{{{members}}}';"


def _config(
    directory: Path,
    listen_spec: str,
    proxy_protocol: bool,
    body: bytes,
    root: Path | None,
    mode: Mode,
    statuses: Mapping[str, int],
) -> str:
    q = _quote
    listen_flags = " proxy_protocol" if proxy_protocol else ""
    ready = directory / _READY_SOCKET
    lines = [
        "# generated by tests/support/nginx.py",
        "daemon off;",
        "master_process off;",
        "worker_processes 1;",
        f"pid {q(str(directory / 'nginx.pid'))};",
        f"lock_file {q(str(directory / 'nginx.lock'))};",
        f"error_log {q(str(directory / 'error.log'))} info;",
    ]
    if mode == "stream":
        lines.insert(1, f"load_module {q(str(NGINX_MODULES / 'ngx_stream_module.so'))};")
    lines.append("events { worker_connections 1024; }")
    access_log = f"access_log {q(str(directory / 'access.log'))} {_LOG_FORMAT};"
    if mode == "http":
        if root is None:
            www = directory / "www"
            www.mkdir()
            (www / "body").write_bytes(body)
            location = f"root {q(str(www))}; try_files /body =404;"
        else:
            location = f"root {q(str(root.resolve()))};"
        (directory / "temp").mkdir()  # nginx makes only the last level of a temp path
        temp_paths = [
            f"{name}_temp_path {q(str(directory / 'temp' / name))};"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        ]
        lines += [
            "http {",
            f"    {_log_format(_HTTP_FIELDS)}",
            f"    {access_log}",
            *(f"    {line}" for line in temp_paths),
            "    default_type application/octet-stream;",
            "    server_tokens off;",
            "    server {",
            f"        listen {listen_spec}{listen_flags};",
            f"        location / {{ {location} }}",
            *(
                f"        location = {q(path)} {{ return {int(status)}; }}"
                for path, status in statuses.items()
            ),
            "    }",
            "    server {",
            f"        listen unix:{ready};",
            "        access_log off;",
            "        location / { return 204; }",
            "    }",
            "}",
        ]
    else:
        lines += [
            "stream {",
            f"    {_log_format(_COMMON_FIELDS)}",
            "    server {",
            f"        listen {listen_spec}{listen_flags};",
            f"        {access_log}",
            f"        return {_stream_literal(body)};",
            "    }",
            "    server {",
            f"        listen unix:{ready};",
            "        access_log off;",
            '        return "";',
            "    }",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _stream_literal(body: bytes) -> str:
    text = body.decode("ascii")
    if "$" in text or "\0" in text:
        raise ValueError(f"stream body cannot hold '$' or NUL: {body!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _start(
    directory: Path,
    listen: str,
    proxy_protocol: bool,
    body: bytes,
    root: Path | None,
    mode: Mode,
    startup_timeout: float,
    binary: Path,
    statuses: Mapping[str, int],
) -> Nginx:
    if statuses and mode != "http":
        raise ValueError("statuses are for mode='http'")
    listen_spec, family, address = _resolve_listen(listen, directory)
    config = directory / "nginx.conf"
    config.write_text(
        _config(directory, listen_spec, proxy_protocol, body, root, mode, statuses),
        encoding="utf-8",
    )
    error_log = directory / "error.log"
    with open(directory / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(
            [str(binary), "-p", f"{directory}/", "-c", str(config), "-e", str(error_log)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    nginx = Nginx(
        process=process,
        directory=directory,
        listen=listen_spec,
        family=family,
        address=address,
        mode=mode,
        proxy_protocol=proxy_protocol,
        access_log=directory / "access.log",
        error_log=error_log,
        config=config,
    )
    try:
        _wait_ready(nginx, directory / _READY_SOCKET, startup_timeout)
    except BaseException:
        nginx.stop()
        raise
    return nginx


def _wait_ready(nginx: Nginx, ready: Path, timeout: float) -> None:
    # nginx binds what it can and retries the rest for 2.5 s, so the private socket may
    # accept while the test's listener is still failing. It writes its pid file only once
    # every listener is bound and listening: wait for that, then connect.
    pid_file = nginx.directory / "nginx.pid"
    deadline = time.monotonic() + timeout
    while True:
        if nginx.process.poll() is not None:
            log = nginx.error_log_text() + _read(nginx.directory / "stderr.log")
            if "Address already in use" in log:
                raise _PortTaken(log)
            raise NginxError(
                f"nginx exited with {nginx.process.returncode} before listening on "
                f"{nginx.listen}\n{log}\nconfig:\n{_read(nginx.config)}"
            )
        if _read(pid_file).strip() == str(nginx.pid):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(ready))
                    return
                except (FileNotFoundError, ConnectionRefusedError):
                    pass
        if time.monotonic() >= deadline:
            raise NginxError(
                f"nginx is not listening on {nginx.listen} after {timeout}s\n"
                f"{nginx.error_log_text()}"
            )
        time.sleep(_POLL_INTERVAL)  # bounded by the deadline above


def _stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    # its own session and group (start_new_session), so this reaches only nginx
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise NginxError(f"nginx pid {process.pid} survived SIGKILL for {timeout}s") from None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the test process dies without its
    # teardown (a hard timeout), the kernel sends nginx SIGKILL (prctl(2)).
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _unlink_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything ``sock`` receives until EOF (a reset counts as EOF)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_http_response(data: bytes) -> HttpResponse:
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        raise NginxError(f"not an HTTP response: {data[:200]!r}")
    status_line, *header_lines = head.decode("iso-8859-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/"):
        raise NginxError(f"not an HTTP status line: {status_line!r}")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HttpResponse(status=int(rest.split(" ", 1)[0]), headers=headers, body=body)
