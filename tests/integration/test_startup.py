"""Start-up: stopped at any moment it leaves nothing behind; what the master cannot set up
is one line and exit status 1; a cap of a billion starts with a small shared mapping."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from tests.support.counting import CountingBackend, outcome
from tests.support.proxy import FORKPROXY, REPO, free_port, run_proxy

MIB = 1 << 20


def _ipc_namespace() -> list[str] | None:
    """A command prefix that runs its command in a new IPC namespace, if we may make one."""
    for prefix in (["unshare", "--ipc"], ["unshare", "--user", "--map-root-user", "--ipc"]):
        try:
            subprocess.run([*prefix, "true"], check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.CalledProcessError):
            continue
        return prefix
    return None


def test_sigterm_at_any_moment_of_start_up_leaves_nothing_behind() -> None:
    """20 starts, each stopped at a random moment between exec and READY=1 (0-150 ms on an
    idle machine: before, during and after the master's set-up), with a cap and a
    per-source limit to set up: no process of its session survives, and its IPC
    namespace holds no object."""
    prefix = _ipc_namespace()
    if prefix is None:
        pytest.skip("cannot make an IPC namespace here (unshare --ipc)")
    seed = random.randrange(1 << 30)
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "tests.support.stop_during_startup", "20", str(seed)]
        + ["--", "-w", "2", "-c", "1000000000", "--max-connections-per-source=2", "127.0.0.1:9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    context = (
        f"seed {seed}, READY after {report['ready_ms']} ms, (delay ms, exit): {report['exits']}"
    )
    assert report["leftover"] == [], context
    assert report["semaphores"] == [], context
    assert report["shared_memory"] == [], context
    assert report["queues"] == [], context


def _memfd_size(pid: int) -> int:
    """The size of the master's shared mapping, from its memfd."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("/memfd:forkproxy"):
                return os.stat(f"/proc/{pid}/fd/{name}").st_size
        except FileNotFoundError:
            continue
    raise AssertionError(f"process {pid} holds no forkproxy memfd")


def _rss_shmem_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    raise AssertionError("no RssShmem in /proc/PID/status")


@pytest.mark.parametrize("cap", ["1048576000", "4294967295"])
def test_a_huge_cap_starts_with_a_small_mapping(workdir, cap: str) -> None:
    """A cap sizes nothing but the per-source table, which has a bound; past it the
    limit still holds (docs/relay-options.md says what a full table does)."""
    with (
        CountingBackend() as backend,
        run_proxy(
            ["-c", cap, "--max-connections-per-source=2", "-w", "2", backend.target], workdir
        ) as proxy,
    ):
        assert _memfd_size(proxy.pid) < 64 * MIB
        assert _rss_shmem_kib(proxy.pid) < 4096  # pages touched so far, not the table
        clients = [proxy.connect() for _ in range(3)]
        assert sorted(outcome(client) for client in clients) == [
            "admitted",
            "admitted",
            "refused",
        ]
        for client in clients:
            client.close()


def _run_limited(limit: str) -> subprocess.CompletedProcess[str]:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is missing")
    return subprocess.run(
        [prlimit, limit, FORKPROXY, f"--listen=127.0.0.1:{free_port()}", "-w", "1", "127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("limit", [8, 10])
def test_too_few_descriptors_at_start_is_one_line(limit: int) -> None:
    result = _run_limited(f"--nofile={limit}:{limit}")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("forkproxy:")]
    assert errors == [
        f"forkproxy: cannot start: Too many open files (the file descriptor limit is {limit}; "
        "raise LimitNOFILE= or ulimit -n)"
    ]


def test_no_room_for_the_shared_memory_is_one_line() -> None:
    """RLIMIT_FSIZE below the mapping's size: memfd's ftruncate fails with EFBIG."""
    result = _run_limited(f"--fsize={MIB}")
    assert (result.returncode, result.stderr) == (
        1,
        "forkproxy: cannot create the shared memory (11 MiB): File too large\n",
    )


def test_the_startup_line_names_every_route(workdir) -> None:
    """One line says where each listener's clients go, by name and address."""
    args = ["-w", "1", "--route", "web=127.0.0.1:9", "--route", "api=/run/nothing.sock"]
    with run_proxy(args, workdir, listeners=("tcp", "tcp"), names=("web", "api")) as proxy:
        web, api = (proxy.address(index)[1] for index in (0, 1))  # type: ignore[index]
        assert proxy.stop() == 0
    assert (
        f"INFO relaying fd 3 'web' (127.0.0.1:{web}) -> 127.0.0.1:9; "
        f"fd 4 'api' (127.0.0.1:{api}) -> /run/nothing.sock with 1 worker, "
        "at most 256 connections\n"
    ) in proxy.stderr()
