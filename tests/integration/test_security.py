"""What forkproxy exposes and touches: it listens exactly where it was asked,
makes unix sockets with the mode it was asked for, and writes nowhere it was not told to.
What it does not protect against is in docs/security.md."""

import fnmatch
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from forkproxy.settings.arguments import _build_parser
from tests.support.procfs import socket_inodes, tcp_sockets, unix_listeners
from tests.support.proxy import (
    FORKPROXY,
    Notifications,
    children_of,
    free_port,
    run_backend,
    send_all_then_read,
)

FORKPROXY_UNITS = str(Path(FORKPROXY).parent / "forkproxy-units")
STRACE = shutil.which("strace")


@contextmanager
def forkproxy(
    args: Sequence[str],
    directory: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    umask: int = -1,
    prefix: Sequence[str] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """forkproxy binding its own sockets (--listen), until READY=1; SIGTERM at the end."""
    notify = Notifications(directory)
    process = subprocess.Popen(
        [*prefix, FORKPROXY, *args],
        env={**os.environ, **(env or {}), "NOTIFY_SOCKET": notify.path},
        cwd=cwd,
        umask=umask,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        notify.wait_for("READY=1", 30)
        yield process
        # Under a prefix (strace) the master is its child; the signal goes to the master.
        (master,) = children_of(process.pid) if prefix else (process.pid,)
        os.kill(master, signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr.decode(errors="replace")
    finally:
        notify.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def owned_inodes(master: int) -> set[int]:
    """Every socket the master and its workers hold."""
    return {inode for pid in [master, *children_of(master)] for inode in socket_inodes(pid)}


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- listening ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "expected_host"),
    [("127.0.0.1:{port}", "127.0.0.1"), ("[::1]:{port}", "::1"), ("{port}", "*")],
    ids=["ipv4-loopback", "ipv6-loopback", "bare-port-is-every-address"],
)
def test_listen_and_metrics_bind_only_what_was_asked(
    workdir: Path, listen: str, expected_host: str
) -> None:
    if ":" in expected_host and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    port, metrics_port = free_port(), free_port()
    with (
        run_backend("echo") as backend,
        forkproxy(
            [
                "-w",
                "2",
                "--listen",
                listen.format(port=port),
                "--metrics",
                f"127.0.0.1:{metrics_port}",
                backend.target,
            ],
            workdir,
        ) as process,
    ):
        ours = owned_inodes(process.pid)
        listening = tcp_sockets("listening")
        mine = sorted(tcp.local for tcp in listening if tcp.inode in ours)
        assert mine == sorted([(expected_host, port), ("127.0.0.1", metrics_port)])
        # Nothing else listens on those ports either (no second, wider socket).
        assert [t.local for t in listening if t.local[1] == port] == [(expected_host, port)]
        assert [t.local for t in listening if t.local[1] == metrics_port] == [
            ("127.0.0.1", metrics_port)
        ]
        assert not set(unix_listeners()) & ours  # and no unix socket at all
        assert not udp_inodes() & ours


def udp_inodes() -> set[int]:
    found = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as lines:
                next(lines)
                found |= {int(line.split()[9]) for line in lines}
        except FileNotFoundError:
            continue
    return found


@pytest.mark.parametrize(
    ("socket_mode", "umask", "expected"),
    [
        (None, 0o022, 0o666),  # the default, as SocketMode= has it
        (None, 0o077, 0o666),  # whatever the umask forkproxy inherits
        ("0600", 0o000, 0o600),  # never wider than asked, even with an open umask
        ("0660", 0o027, 0o660),
    ],
)
def test_unix_sockets_get_the_mode_asked_for(
    workdir: Path, socket_mode: str | None, umask: int, expected: int
) -> None:
    front, metrics = workdir / "front.sock", workdir / "metrics.sock"
    mode_args = [] if socket_mode is None else ["--socket-mode", socket_mode]
    with (
        run_backend("echo") as backend,
        forkproxy(
            ["-w", "1", "--listen", str(front), "--metrics", str(metrics), *mode_args]
            + [backend.target],
            workdir,
            umask=umask,
        ),
    ):
        for path in (front, metrics):
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == expected, f"{path}: {oct(st.st_mode)}"
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(front))
            assert send_all_then_read(client, b"through the socket") == b"through the socket"
    assert not front.exists() and not metrics.exists()  # removed at exit: they were ours


# -- writing -----------------------------------------------------------------------------

# Every option of forkproxy, with a value, in one of the two runs below. A new option must
# be added here, so that it is checked too (test_every_option_is_in_the_write_audit).
DAEMON_OPTIONS = (
    "--connections-max",
    "--exit-idle-time",
    "--workers",
    "--listen",
    "--socket-mode",
    "--metrics",
    "--graceful-timeout",
    "--worker-timeout",
    "--log-level",
    "--proxy-protocol",
    "--connect-timeout",
    "--idle-timeout",
    "--keepalive",
    "--nodelay",
    "--no-nodelay",
    "--pipe-size",
    "--on-limit",
    "--connections-max-per-source",
    "--max-connections-per-source",
    "--route",
    "--datagram-timeout",
    "--datagram-replies",
    "--check-interval",
    "--check-http",
    "--check-rise",
    "--check-fall",
    "--check-timeout",
    "--config",
    "--balance",
    "--backup",
    "--connect-retry",
)
INETD_OPTIONS = ("--inetd",)
CHECK_OPTIONS = ("--check",)
NOT_RUN = ("--help", "--version")  # they print and exit

# strace(1) lines of calls that create, change or remove a file.
_WRITE_CALL = re.compile(
    r"^\d+\s+(?P<call>openat|open|creat|mkdir|mkdirat|unlink|unlinkat|rmdir|rename|renameat2?|"
    r"link|linkat|symlink|symlinkat|mknod|mknodat|chmod|fchmodat2?|chown|lchown|fchownat|"
    r"truncate|utimes|utimensat|bind)\((?P<args>.*)\)\s+=\s+(?P<result>.*)$"
)
_OPEN_FOR_WRITE = re.compile(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC")


def written_paths(trace: Path, cwd: Path) -> set[str]:
    """The paths every traced process created, changed or removed (or tried to)."""
    paths = set()
    for line in trace.read_text(errors="replace").splitlines():
        match = _WRITE_CALL.match(line)
        if match is None:
            continue
        call, args = match["call"], match["args"]
        if call in ("open", "openat") and not _OPEN_FOR_WRITE.search(args):
            continue
        if call == "bind":
            found = re.search(r'sun_path="([^"]*)"', args)  # abstract (@...) is no file
            names = [found.group(1)] if found else []
        else:
            names = re.findall(r'"((?:[^"\\]|\\.)*)"', args)
        for name in names:
            paths.add(os.path.normpath(os.path.join(cwd, name)))
    return paths


def listing(directories: Sequence[Path]) -> set[str]:
    found = set()
    for directory in directories:
        for root, dirs, files in os.walk(directory):
            found |= {os.path.join(root, name) for name in dirs + files}
    return found


def test_every_option_is_in_the_write_audit() -> None:
    known = {
        option
        for action in _build_parser()._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    assert known == set(DAEMON_OPTIONS + INETD_OPTIONS + CHECK_OPTIONS + NOT_RUN)


@pytest.mark.skipif(STRACE is None, reason="needs strace(1) to see every file call")
def test_no_option_writes_outside_the_paths_it_was_given(workdir: Path) -> None:
    """Every option, run in a fresh cwd, HOME and TMPDIR, under strace -f: the only files
    created, changed or removed are the socket files and the unit directory it was given.

    /tmp is shared with other test runs, so its listing proves nothing; the trace covers
    it (and every other place) instead. PYTHONDONTWRITEBYTECODE: a stale .pyc is Python's
    to rewrite, not an option's."""
    assert STRACE is not None
    cwd, home, tmp, given = (workdir / name for name in ("cwd", "home", "tmp", "given"))
    for directory in (cwd, home, tmp, given):
        directory.mkdir()
    front, metrics, units = given / "front.sock", given / "metrics.sock", given / "units"
    env = {"HOME": str(home), "TMPDIR": str(tmp), "PYTHONDONTWRITEBYTECODE": "1"}
    traces = []

    def traced(name: str) -> list[str]:
        traces.append(workdir / f"{name}.trace")
        return [STRACE, "-f", "-qq", "-e", "trace=%file,bind", "-o", str(traces[-1])]

    config_file = given / "forkproxy.toml"
    config_file.write_text('log-level = "debug"\n[listeners.web]\nidle-timeout = "2min"\n')
    before = listing([cwd, home, tmp, given])
    with run_backend("echo") as backend, run_backend("echo") as routed:
        web_port = free_port()
        daemon = [
            *("--config", str(config_file)),
            *("--connections-max", "10", "--exit-idle-time", "1h", "--workers", "2"),
            *("--listen", f"web=127.0.0.1:{web_port}", "--listen", str(front)),
            *("--socket-mode", "0640", "--metrics", str(metrics)),
            *("--graceful-timeout", "5s", "--worker-timeout", "30s", "--log-level", "debug"),
            *("--proxy-protocol=v2", "--connect-timeout", "5s", "--idle-timeout", "1min"),
            *("--keepalive=30,5,3", "--no-nodelay", "--nodelay", "--pipe-size", "128K"),
            *("--on-limit", "queue", "--max-connections-per-source", "5"),
            *("--connections-max-per-source", "5"),
            *("--datagram-timeout", "10s", "--datagram-replies", "1"),
            # One check in the test's time (fall 3): the echo targets stay up.
            *("--check-interval", "1h", "--check-http", "/", "--check-rise", "1"),
            *("--check-fall", "3", "--check-timeout", "2s"),
            # First: the backup (nothing listens there) is never tried.
            *("--balance", "first", "--backup", "127.0.0.1:1", "--connect-retry", "1s"),
            *("--route", f"web={routed.target}", backend.target),
        ]
        options = {arg.partition("=")[0] for arg in daemon if arg.startswith("--")}
        assert options == set(DAEMON_OPTIONS)
        # --check: the same settings checked, nothing bound, nothing written.
        check = subprocess.run(
            [*traced("check"), FORKPROXY, "--check", *daemon],
            env={**os.environ, **env},
            cwd=cwd,
            capture_output=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stderr
        with forkproxy(daemon, workdir, env=env, cwd=cwd, prefix=traced("daemon")):
            with socket.create_connection(("127.0.0.1", web_port), timeout=10) as client:
                assert send_all_then_read(client, b"web").endswith(b"web")  # after the header
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(10)
                client.connect(str(front))
                assert send_all_then_read(client, b"front").endswith(b"front")
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(10)
                client.connect(str(metrics))
                reply = send_all_then_read(client, b"GET /metrics HTTP/1.0\r\n\r\n")
                assert reply.startswith(b"HTTP/1.") and b"forkproxy_connections_" in reply

        # --inetd: the connection is standard input.
        client, connection = socket.socketpair()
        with client, connection:
            inetd = subprocess.Popen(
                [*traced("inetd"), FORKPROXY, "--inetd", "--log-level", "debug", backend.target],
                env={**os.environ, **env},
                cwd=cwd,
                stdin=connection.fileno(),
                stderr=subprocess.PIPE,
            )
            connection.close()
            client.settimeout(10)
            assert send_all_then_read(client, b"inetd") == b"inetd"
            _, stderr = inetd.communicate(timeout=30)
            assert inetd.returncode == 0, stderr

    # forkproxy-units writes only into --output-dir, and nothing at all without it.
    units_args = [
        *("web", "--listen-stream", "127.0.0.1:8080", "--listen-unix", "/run/web.sock"),
        *("--socket-user", "www", "--socket-group", "www", "--socket-mode", "0660"),
        *("--backlog", "128", "--metrics", "127.0.0.1:9100", "--target-unit", "app.service"),
        *("--description", "web", "--executable", "/usr/bin/forkproxy"),
        *("--", "127.0.0.1:9000", "-c", "10"),
    ]
    for name, extra in (("dry-run", []), ("units", ["--output-dir", str(units), "--force"])):
        result = subprocess.run(
            [*traced(name), FORKPROXY_UNITS, *units_args[:1], *extra, *units_args[1:]],
            env={**os.environ, **env},
            cwd=cwd,
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr

    unit_files = {str(units / "web.socket"), str(units / "web.service")}
    unit_files |= {str(units / "web-metrics.socket")} & {str(p) for p in units.iterdir()}
    assert listing([cwd, home, tmp, given]) - before == {str(units)} | unit_files
    assert before - listing([cwd, home, tmp, given]) == set()
    allowed = {str(front), str(metrics), str(units)} | unit_files
    for trace in traces:
        written = written_paths(trace, cwd)
        # forkproxy-units' temporary files, each renamed to a unit file (or removed).
        temporary = {
            path
            for path in written
            if Path(path).parent == units
            and fnmatch.fnmatch(Path(path).name, ".forkproxy-units-*.tmp")
        }
        assert written - temporary <= allowed, trace.name
        assert not any(Path(path).exists() for path in temporary)
    assert written_paths(workdir / "dry-run.trace", cwd) == set()
    assert written_paths(workdir / "check.trace", cwd) == set()
    # The trace does see writes: the sockets it was told to make, the units it was asked for.
    assert written_paths(workdir / "daemon.trace", cwd) == {str(front), str(metrics)}
    assert unit_files <= written_paths(workdir / "units.trace", cwd)
