"""Running the real forkproxy command, real backends and clients, for integration tests.

The harness binds listening sockets itself and passes them as fd 3, 4, ... through
`tests.support.activate` (no free-port race), waits for READY=1 on its own
$NOTIFY_SOCKET, and kills the proxy's whole process group on teardown.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FORKPROXY = str(Path(sys.executable).parent / "forkproxy")
REPO = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], object], timeout: float, what: str = "condition") -> None:
    """Poll `condition` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Backend:
    process: subprocess.Popen[str]
    target: str  # as a forkproxy target: 127.0.0.1:PORT, [::1]:PORT, /path, @name

    @property
    def port(self) -> int:
        return int(self.target.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextlib.contextmanager
def run_backend(
    mode: str, address: str = "tcp:127.0.0.1:0", module: str = "tests.support.backend"
) -> Iterator[Backend]:
    """A backend from tests.support.backend (or tests.support.message_backend, for
    datagram and sequential-packet targets) in its own process; see it for modes."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, mode, address],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("READY "):
        process.kill()
        raise RuntimeError(f"backend {mode} {address} did not start: {line!r}")
    backend = Backend(process, line.split(" ", 1)[1].strip())
    try:
        yield backend
    finally:
        backend.stop()


class Notifications:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / f"notify-{time.monotonic_ns()}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def _drain(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return

    def lines(self) -> list[str]:
        self._drain()
        return [line for message in self.messages for line in message.split("\n")]

    def wait_for(self, line: str, timeout: float = 10.0) -> None:
        wait_until(lambda: line in self.lines(), timeout, f"{line!r} on $NOTIFY_SOCKET")

    def count(self, line: str) -> int:
        return self.lines().count(line)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    listeners: list[socket.socket]
    notifications: Notifications
    stderr_path: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def address(self, index: int = 0) -> object:
        return self.listeners[index].getsockname()

    def connect(self, index: int = 0, timeout: float = 10.0) -> socket.socket:
        """A client connected to listener `index` (a stream or sequential-packet one), or
        for a datagram listener a datagram socket connected to it (bound, if unix, so
        that replies can reach it)."""
        listener = self.listeners[index]
        sock = socket.socket(listener.family, listener.type)
        sock.settimeout(timeout)
        if listener.type == socket.SOCK_DGRAM and listener.family == socket.AF_UNIX:
            sock.bind("")  # autobind: an address for the replies
        sock.connect(listener.getsockname())
        return sock

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        return children_of(self.pid)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now, for programs that bind by number themselves."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def connect_when_listening(port: int, timeout: float = 10.0) -> socket.socket:
    """Connect to 127.0.0.1:port as soon as something listens there."""
    connected: list[socket.socket] = []

    def attempt() -> bool:
        try:
            connected.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        except ConnectionRefusedError:
            return False
        return True

    wait_until(attempt, timeout, f"a listener on port {port}")
    return connected[0]


def children_of(pid: int) -> list[int]:
    """Live child pids of `pid`, from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry))
    return sorted(children)


def process_state(pid: int) -> str:
    """The one-letter state from /proc/PID/stat ("" if the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


# Datagram listeners get a receive buffer for bursts (the kernel caps it at rmem_max).
DATAGRAM_RECEIVE_BUFFER = 4 << 20


def make_listener(spec: str, directory: Path) -> socket.socket:
    """A listening socket for the proxy: 'tcp' (127.0.0.1), 'tcp6' (::1), 'unix',
    'abstract', 'seqpacket' (a unix path), or a bound datagram socket: 'udp'
    (127.0.0.1), 'udp6' (::1), 'unix-dgram' (a unix path)."""
    if spec == "tcp":
        return socket.create_server(("127.0.0.1", 0), backlog=1024)
    if spec == "tcp6":
        return socket.create_server(("::1", 0), family=socket.AF_INET6, backlog=1024)
    if spec in ("udp", "udp6"):
        family, host = (socket.AF_INET, "127.0.0.1") if spec == "udp" else (socket.AF_INET6, "::1")
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, DATAGRAM_RECEIVE_BUFFER)
        sock.bind((host, 0))
        return sock
    kind = {"unix-dgram": socket.SOCK_DGRAM, "seqpacket": socket.SOCK_SEQPACKET}
    sock = socket.socket(socket.AF_UNIX, kind.get(spec, socket.SOCK_STREAM))
    if spec != "abstract":
        sock.bind(str(directory / f"proxy-{len(os.listdir(directory))}.sock"))
    else:
        sock.bind(f"\0forkproxy-test-{os.getpid()}-{time.monotonic_ns()}")
    if sock.type == socket.SOCK_DGRAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, DATAGRAM_RECEIVE_BUFFER)
    else:
        sock.listen(1024)
    return sock


@contextlib.contextmanager
def run_proxy(
    args: Sequence[str],
    directory: Path,
    listeners: Sequence[str] = ("tcp",),
    names: Sequence[str] = (),
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    stderr_path: Path | None = None,
    wrapper: Sequence[str] = (),
    executable: str = FORKPROXY,
) -> Iterator[Proxy]:
    """The installed forkproxy with listening sockets passed as in socket activation.

    `wrapper` is a command that execs forkproxy in its own place, keeping the pid
    (`prlimit --nofile=64:64`); `executable` another forkproxy command (another venv's).
    """
    sockets = [make_listener(spec, directory) for spec in listeners]
    notifications = Notifications(directory)
    if stderr_path is None:
        stderr_path = directory / f"forkproxy-{time.monotonic_ns()}.log"
    fd_specs = [
        f"{sock.fileno()}:{names[i]}" if i < len(names) else str(sock.fileno())
        for i, sock in enumerate(sockets)
    ]
    command = [
        *(sys.executable, "-m", "tests.support.activate", *fd_specs, "--"),
        *(*wrapper, executable, *args),
    ]
    process_env = {**os.environ, "NOTIFY_SOCKET": notifications.path, **(env or {})}
    with open(stderr_path, "ab") as stderr:  # append: the file's inode may be $JOURNAL_STREAM
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=process_env,
            stdin=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=[sock.fileno() for sock in sockets],
            start_new_session=True,
        )
    proxy = Proxy(process, sockets, notifications, stderr_path)
    try:
        if wait_ready:
            wait_until(
                lambda: "READY=1" in notifications.lines() or process.poll() is not None,
                15,
                "READY=1",
            )
            if process.poll() is not None:
                raise AssertionError(f"forkproxy exited {process.returncode}: {proxy.stderr()}")
        yield proxy
    finally:
        proxy.kill_group()
        for sock in sockets:
            sock.close()
        notifications.close()


def send_all_then_read(sock: socket.socket, payload: bytes, half_close: bool = True) -> bytes:
    """Send `payload` (from a thread, so large echoes cannot deadlock), read to EOF."""
    error: list[BaseException] = []

    def sender() -> None:
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by the reader
            error.append(exc)

    thread = threading.Thread(target=sender)
    thread.start()
    received = bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        received += chunk
    thread.join()
    if error:
        raise error[0]
    return bytes(received)


def run_cli(
    args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 10
) -> subprocess.CompletedProcess[str]:
    """Run forkproxy to completion (for argument errors): exit status, stdout, stderr."""
    return subprocess.run(
        [FORKPROXY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
