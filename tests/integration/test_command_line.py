"""Bad input: one clear line on stderr, exit status 1 (as systemd-socket-proxyd), no traceback."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.proxy import FORKPROXY, REPO, run_cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "missing target"),
        (["a:1", "--route=web"], "invalid route 'web': expected NAME=TARGET"),
        (["--pipe-size=12Q", "x:1"], "invalid --pipe-size= value '12Q'"),
        (["--pipe-size=2G", "x:1"], "invalid --pipe-size= value '2G'"),
        (["--on-limit=wait", "x:1"], "invalid --on-limit= value 'wait': expected refuse or queue"),
        (["--proxy-protocol=v3", "x:1"], "expected v1 or v2"),
        (["--keepalive=1,2", "x:1"], "expected IDLE,INTERVAL,PROBES"),
        (["--connect-timeout=0", "x:1"], "--connect-timeout= must be longer than 0"),
        (["--max-connections-per-source=-1", "x:1"], "expected a whole number"),
        (["vsock:1", "--listen=127.0.0.1:0"], "expected vsock:CID:PORT"),
        (
            ["--listen=web=@forkproxy-test-route-names", "--route=api=x:1", "x:1"],
            "--route=api=...: no listening socket is named 'api' (named: 'web'",
        ),
        (["--bogus", "x:1"], "unrecognized arguments: --bogus"),
        (["-c", "0", "x:1"], "--connections-max= must be at least 1"),
        (["-c", "4294967296", "x:1"], "--connections-max= must be at most 4294967295, got"),
        (["-c", "abc", "x:1"], "invalid --connections-max= value 'abc'"),
        (["-c"], "option '--connections-max': expected one argument"),
        (["--exit-idle-time=5 minutess", "x:1"], "unknown unit 'minutess'"),
        (["--exit-idle-time=-1", "x:1"], "negative"),
        (["-w", "0", "x:1"], "--workers= must be in 1-128"),
        (["--graceful-timeout=soon", "x:1"], "invalid --graceful-timeout= value 'soon'"),
        (["::1:80"], "write IPv6 addresses in brackets"),
        (["127.0.0.1:99999"], "port 99999 is not in 1-65535"),
        (["127.0.0.1:nosuchservice"], "neither a port number nor a known service"),
        (["/" + "x" * 200], "unix socket paths are at most 107 bytes"),
        (["--listen=localhost:80", "x:1"], "is not an IP address"),
        (["--socket-mode=999", "--listen=/tmp/x.sock", "x:1"], "expected octal"),
        (["127.0.0.1:80"], "no sockets passed in by systemd (LISTEN_FDS) and no --listen"),
        (["-w", "9" * 5000, "x:1"], "invalid --workers= value '999"),
        (["x:" + "9" * 5000], "invalid target 'x:999"),
        (["-p", "v3", "x:1"], "option '-p' takes its version attached: write -pv3 or"),
        (["--proxy-protocol", "v2", "x:1"], "option '--proxy-protocol' takes its version"),
        (["--keepalive", "60s,10s,6", "x:1"], "option '--keepalive' takes its value attached"),
        (["--inet", "x:1"], "unrecognized arguments: --inet"),
        (["--inetd", "--metrics=127.0.0.1:9100", "x:1"], "cannot be used with --inetd"),
        (["--inetd", "--route=web=x:2", "x:1"], "--route cannot be used with --inetd"),
        (["-l", "/tmp/a.sock", "-l", "/tmp/a.sock", "x:1"], "--listen=/tmp/a.sock is given twice"),
        (["--metrics=0:\n", "x:1"], "invalid metrics address '0:\\n'"),
        (["--pipe-size=8388608K", "x:1"], "--pipe-size= must be in 4K-1024M, got '8388608K'"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(args: list[str], message: str) -> None:
    result = run_cli(args, env={"LISTEN_PID": "", "LISTEN_FDS": ""})
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("forkproxy: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_passed_fd_that_is_not_a_listening_socket(tmp_path: Path) -> None:
    """Among several passed fds, a connected socket is refused with a clear line.

    (One connected socket alone is Accept=yes, see test_accept_inetd.py.)
    """
    listener = socket.create_server(("127.0.0.1", 0))
    left, right = socket.socketpair()
    with listener, left, right:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.support.activate",
                str(listener.fileno()),
                str(left.fileno()),
                "--",
                FORKPROXY,
                "127.0.0.1:9",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            pass_fds=[listener.fileno(), left.fileno()],
        )
    assert result.returncode == 1
    assert result.stderr.strip() == "forkproxy: fd 4 from systemd is not a listening stream socket"


def test_passed_fd_that_is_not_a_socket(tmp_path: Path) -> None:
    with open(tmp_path / "file", "w") as plain:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.support.activate",
                str(plain.fileno()),
                "--",
                FORKPROXY,
                "127.0.0.1:9",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            pass_fds=[plain.fileno()],
        )
    assert result.returncode == 1
    assert result.stderr.startswith("forkproxy: fd 3 from systemd is not a socket")


def test_help_and_version_exit_0() -> None:
    help_result = run_cli(["--help"])
    assert help_result.returncode == 0
    for option in ("--connections-max", "--exit-idle-time", "--workers", "--listen", "--version"):
        assert option in help_result.stdout
    assert help_result.stdout.rstrip().endswith("man forkproxy")
    version = run_cli(["--version"])
    assert version.returncode == 0
    assert version.stdout.startswith("forkproxy ")


def test_python_dash_m_runs_the_same_program() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "forkproxy", "--version"], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 0 and result.stdout.startswith("forkproxy ")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX])
@pytest.mark.parametrize("inetd", [False, True], ids=["listen-fds", "inetd"])
def test_a_passed_socket_bound_but_not_listening_is_an_error(
    workdir: Path, family: int, inetd: bool
) -> None:
    """Neither a listener nor a connection (listen() never called): exit status 1, and no
    connection to the target, as if it were an Accept=yes connection."""
    target = socket.create_server(("127.0.0.1", 0))
    target.setblocking(False)
    bound = socket.socket(family, socket.SOCK_STREAM)
    bound.bind(("127.0.0.1", 0) if family == socket.AF_INET else str(workdir / "bound.sock"))
    destination = f"127.0.0.1:{target.getsockname()[1]}"
    if inetd:
        command = [FORKPROXY, "--inetd", destination]
        what = "standard input (--inetd)"
    else:
        activate = [sys.executable, "-m", "tests.support.activate", str(bound.fileno()), "--"]
        command = [*activate, FORKPROXY, destination]
        what = "fd 3 from systemd"
    with target, bound:
        result = subprocess.run(
            command,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            stdin=bound.fileno() if inetd else subprocess.DEVNULL,
            pass_fds=[] if inetd else [bound.fileno()],
        )
        with pytest.raises(BlockingIOError):
            target.accept()  # nothing connected to the target
    assert result.returncode == 1
    assert result.stderr == (
        f"forkproxy: {what} is not a listening stream socket: listen() was not called on it, "
        "and it is not a connection either\n"
    )


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv(1)")
def test_a_pipe_size_the_kernel_refuses_is_named_as_typed(workdir: Path) -> None:
    """Without CAP_SYS_RESOURCE, pipes beyond /proc/sys/fs/pipe-max-size are refused at
    start; the error names --pipe-size as the user wrote it, not in bytes."""
    max_size = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    if max_size >= 1 << 30:
        pytest.skip("pipe-max-size allows 1024M pipes")
    listener = socket.create_server(("127.0.0.1", 0))
    drop = ["setpriv", "--bounding-set=-sys_resource", "--inh-caps=-sys_resource"]
    with listener:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "tests.support.activate", str(listener.fileno()), "--"),
                *(*drop, FORKPROXY, "-w", "1", "--pipe-size=1024M", "127.0.0.1:9"),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=20,
            pass_fds=[listener.fileno()],
        )
    assert result.returncode == 1
    assert result.stderr.startswith(
        "forkproxy: cannot make pipes of --pipe-size=1024M: Operation not permitted"
    ), result.stderr
    assert result.stderr.count("\n") == 1
