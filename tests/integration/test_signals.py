"""Every signal an admin may send is safe: to the master, to the whole process group,
during start-up, and 200 of them at random under load."""

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy import (
    FORKPROXY,
    Notifications,
    Proxy,
    run_backend,
    run_proxy,
    send_all_then_read,
    wait_until,
)
from tests.support.supervision import (
    METRICS_LISTENERS,
    METRICS_NAMES,
    RequestLoad,
    converged,
    get,
)

# Signals whose default action ends a process, and two that do nothing by default.
NO_JOB_SIGNALS = [
    signal.SIGUSR1,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    signal.SIGWINCH,
    signal.SIGURG,
]


def _echo(proxy: Proxy, text: bytes) -> None:
    with proxy.connect() as client:
        assert send_all_then_read(client, text) == text


def _logged(signum: int) -> str:
    if signum == signal.SIGUSR1:
        return "SIGUSR1: no log files to reopen"
    return f"ignoring {signal.Signals(signum).name} (logged once)"


def test_signals_without_a_job_neither_stop_nor_disturb(workdir: Path) -> None:
    with run_backend("echo") as backend, run_proxy(["-w", "2", backend.target], workdir) as proxy:
        workers = proxy.workers()
        for signum in NO_JOB_SIGNALS:
            line = _logged(signum)
            for count in (1, 2):  # one at a time: signals of a kind do not queue
                proxy.signal(signum)
                wait_until(
                    lambda line=line, count=count: (
                        proxy.stderr().count(line) >= count
                        or ("once" in line and proxy.stderr().count(line) == 1)
                    ),
                    10,
                    line,
                )
        for signum in NO_JOB_SIGNALS:  # workers too: the parent-death signal among them
            os.killpg(proxy.pid, signum)
        wait_until(lambda: proxy.stderr().count(_logged(signal.SIGUSR1)) >= 3, 10, "the last")
        _echo(proxy, b"still relaying")
        assert proxy.process.poll() is None
        assert proxy.workers() == workers  # none died, none replaced
        assert proxy.stop() == 0
    log = proxy.stderr()
    for signum in NO_JOB_SIGNALS[2:]:
        assert log.count(_logged(signum)) == 1
    assert "exited" not in log and "killed by signal" not in log, log


def test_a_sighup_during_start_up_does_not_kill_the_master(workdir: Path) -> None:
    """SIGHUP as soon as the socket file exists, while the master is still setting up
    (loading the metrics code takes a while): the reload waits for READY=1, then runs."""
    path = workdir / "front.sock"
    notify = Notifications(workdir)
    with run_backend("echo") as backend:
        process = subprocess.Popen(
            [
                *(FORKPROXY, "-w", "2", "--listen", str(path)),
                *("--metrics", str(workdir / "metrics.sock"), backend.target),
            ],
            env={**os.environ, "NOTIFY_SOCKET": notify.path},
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            wait_until(path.exists, 10, "the socket file")
            process.send_signal(signal.SIGHUP)
            wait_until(
                lambda: "READY=1" in notify.lines() or process.poll() is not None,
                15,
                "READY=1",
            )
            assert process.poll() is None
            wait_until(
                lambda: notify.lines().count("READY=1") == 2 or process.poll() is not None,
                30,
                "the reload's READY=1",
            )
            assert "RELOADING=1" in notify.lines()
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            assert process.stderr is not None
            process.stderr.close()
            notify.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_sent_to_the_process_group_is_a_stop(workdir: Path, signum: int) -> None:
    """kill -TERM -PGID (and Ctrl-C's SIGINT): idle workers stop at once by themselves,
    and their exits must not read as deaths to replace."""
    with run_backend("echo") as backend:
        for _ in range(10):
            with run_proxy(["-w", "6", backend.target], workdir) as proxy:
                os.killpg(proxy.pid, signum)
                assert proxy.wait(15) == 0
            log = proxy.stderr()
            assert "replacement" not in log and "exited" not in log, log


@contextlib.contextmanager
def _own_ipc_namespace() -> Iterator[tuple[list[str], list[int]]]:
    """A wrapper that runs forkproxy in a new IPC namespace (same pid), and a list that
    gets an open handle on that namespace, so it can be inspected after forkproxy exits."""
    if subprocess.run(["unshare", "--ipc", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make an IPC namespace here (unshare --ipc needs CAP_SYS_ADMIN)")
    handles: list[int] = []
    try:
        yield ["unshare", "--ipc"], handles
    finally:
        for fd in handles:
            os.close(fd)


def _ipc_objects(namespace_fd: int) -> str:
    """Every SysV IPC object in the namespace, as /proc/sysvipc lists them (minus headers)."""
    listing = subprocess.run(
        [
            *("nsenter", f"--ipc=/proc/self/fd/{namespace_fd}", "--"),
            *("sh", "-c", "tail -q -n +2 /proc/sysvipc/sem /proc/sysvipc/shm /proc/sysvipc/msg"),
        ],
        capture_output=True,
        text=True,
        check=True,
        pass_fds=[namespace_fd],
    )
    return listing.stdout


def _check_the_listing(namespace_fd: int) -> None:
    """A check of the check: an object made in the namespace shows in its listing."""
    enter = ["nsenter", f"--ipc=/proc/self/fd/{namespace_fd}", "--"]
    made = subprocess.run(
        [*enter, "ipcmk", "-S", "1"],
        capture_output=True,
        text=True,
        check=True,
        pass_fds=[namespace_fd],
    )
    semid = made.stdout.split()[-1]
    try:
        assert semid in _ipc_objects(namespace_fd).split()
    finally:
        subprocess.run([*enter, "ipcrm", "-s", semid], check=True, pass_fds=[namespace_fd])


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def test_a_storm_of_200_signals_under_load(workdir: Path) -> None:
    """200 signals at random among HUP, TTIN, TTOU, USR1, USR2, WINCH and ALRM while 20
    clients loop requests through a real target: no request fails, the workers converge to
    the target and serve, and a stop leaves no IPC object and no process behind."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    kinds = [
        signal.SIGHUP,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
        signal.SIGALRM,
    ]
    with (
        _own_ipc_namespace() as (wrapper, handles),
        run_backend("echo") as backend,
        run_proxy(
            ["-w", "3", backend.target],
            workdir,
            listeners=METRICS_LISTENERS,
            names=METRICS_NAMES,
            wrapper=wrapper,
        ) as proxy,
    ):
        handles.append(os.open(f"/proc/{proxy.pid}/ns/ipc", os.O_RDONLY))
        _check_the_listing(handles[0])
        with RequestLoad(proxy) as load:
            for _ in range(200):
                proxy.signal(rng.choice(kinds))
                time.sleep(rng.uniform(0, 0.03))  # the scenario: a storm, not synchronisation
            wait_until(lambda: converged(proxy), 60, f"convergence (seed {seed})")
            load.more()
        assert load.failures == [], f"seed {seed}"
        assert get(proxy, "/healthz")[0] == 200
        assert proxy.stop(30) == 0
        wait_until(lambda: not _group_members(proxy.pid), 10, "the process group to be gone")
        assert _ipc_objects(handles[0]) == ""
