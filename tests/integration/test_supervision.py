"""The master supervises: idle exit, rotation and scaling under load, hung and dead
workers, a crash loop, its own death, and the systemd watchdog."""

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.proxy import (
    FORKPROXY,
    Notifications,
    children_of,
    free_port,
    process_state,
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
    gauges,
)


def test_exit_idle_time_counts_from_the_last_close(workdir: Path) -> None:
    with (
        run_backend("echo") as backend,
        run_proxy(["-w", "2", "--exit-idle-time=1s", backend.target], workdir) as proxy,
    ):
        client = proxy.connect()
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        time.sleep(3)  # the scenario: a connection open for three times the idle time
        assert proxy.process.poll() is None
        closed_at = time.monotonic()
        client.close()
        assert proxy.wait(10) == 0
        assert time.monotonic() - closed_at >= 1.0  # never before the idle time
        assert "STOPPING=1" in proxy.notifications.lines()


def test_sighup_rotates_workers_without_failing_a_request(workdir: Path) -> None:
    with run_backend("echo") as backend, run_proxy(["-w", "2", backend.target], workdir) as proxy:
        old = set(proxy.workers())
        with RequestLoad(proxy) as load:
            proxy.signal(signal.SIGHUP)
            wait_until(
                lambda: len(proxy.workers()) == 2 and not set(proxy.workers()) & old,
                30,
                "the old workers to be replaced",
            )
            load.more()
        assert load.failures == []


def test_sigttin_and_sigttou_scale_without_failing_a_request(workdir: Path) -> None:
    with run_backend("echo") as backend, run_proxy(["-w", "2", backend.target], workdir) as proxy:
        with RequestLoad(proxy) as load:
            proxy.signal(signal.SIGTTIN)
            wait_until(lambda: len(proxy.workers()) == 3, 10, "a third worker")
            load.more()
            proxy.signal(signal.SIGTTOU)
            wait_until(lambda: len(proxy.workers()) == 2, 10, "back to two workers")
            load.more()
            proxy.signal(signal.SIGTTOU)  # (signals of one kind do not queue: one at a time)
            wait_until(lambda: len(proxy.workers()) == 1, 10, "one worker left")
            load.more()
            proxy.signal(signal.SIGTTOU)  # never below one worker
            load.more()
            assert len(proxy.workers()) == 1
        assert load.failures == []
    assert "already at one worker" in proxy.stderr()


def test_a_frozen_worker_is_replaced_after_the_worker_timeout(workdir: Path) -> None:
    with (
        run_backend("echo") as backend,
        run_proxy(["-w", "2", "--worker-timeout=2s", backend.target], workdir) as proxy,
    ):
        frozen = proxy.workers()[0]
        os.kill(frozen, signal.SIGSTOP)
        wait_until(
            lambda: frozen not in proxy.workers() and len(proxy.workers()) == 2,
            15,
            "the frozen worker to be replaced",
        )
        assert "has not run its event loop for 2s, killing it" in proxy.stderr()
        for _ in range(4):  # whichever worker accepts, it answers
            with proxy.connect() as client:
                assert send_all_then_read(client, b"alive") == b"alive"


def test_workers_do_not_outlive_a_killed_master(workdir: Path) -> None:
    with run_backend("echo") as backend, run_proxy(["-w", "3", backend.target], workdir) as proxy:
        workers = proxy.workers()
        assert len(workers) == 3
        os.kill(proxy.pid, signal.SIGKILL)
        wait_until(
            lambda: all(process_state(pid) in ("", "Z") for pid in workers),
            2,  # PR_SET_PDEATHSIG ends them at once
            "every worker to exit",
        )


def test_port_is_free_for_a_new_instance_after_the_master_is_killed(workdir: Path) -> None:
    """Only the master is killed; its workers leave by themselves within 2 s,
    closing their copies of the listener, so a new instance can bind the port at once."""
    port = free_port()
    started: list[subprocess.Popen[bytes]] = []
    with run_backend("echo") as backend:
        try:
            for attempt in range(3):
                notify = Notifications(workdir)
                process = subprocess.Popen(
                    [FORKPROXY, "-w", "2", "--listen", f"127.0.0.1:{port}", backend.target],
                    env={**os.environ, "NOTIFY_SOCKET": notify.path},
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                started.append(process)
                try:
                    notify.wait_for("READY=1")
                finally:
                    notify.close()
                with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                    assert send_all_then_read(client, b"instance %d" % attempt) == (
                        b"instance %d" % attempt
                    )
                workers = children_of(process.pid)
                assert len(workers) == 2
                os.kill(process.pid, signal.SIGKILL)  # the master only, not its group
                process.wait()
                wait_until(
                    lambda workers=workers: all(process_state(p) in ("", "Z") for p in workers),
                    2,
                    "every worker to exit",
                )
        finally:
            for process in started:  # only if a worker outlived its master
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_workers_crashing_at_every_start_end_the_master_with_a_clear_error(workdir: Path) -> None:
    with (
        run_backend("echo") as backend,
        run_proxy(
            ["-w", "2", backend.target],
            workdir,
            env={"FORKPROXY_FAILPOINT": "worker-crash"},
            wait_ready=False,
        ) as proxy,
    ):
        assert proxy.wait(30) == 1
        assert "workers keep dying" in proxy.stderr()
        assert "READY=1" not in proxy.notifications.lines()


def test_watchdog_pings_only_while_workers_heartbeat(workdir: Path) -> None:
    with (
        run_backend("echo") as backend,
        run_proxy(
            ["-w", "2", "--worker-timeout=60s", backend.target],
            workdir,
            env={"WATCHDOG_USEC": "1000000"},
        ) as proxy,
    ):
        notifications = proxy.notifications
        wait_until(lambda: notifications.count("WATCHDOG=1") >= 3, 10, "watchdog pings")
        frozen = proxy.workers()[0]
        os.kill(frozen, signal.SIGSTOP)
        try:
            time.sleep(1.5)  # past the point where its heartbeat is stale
            before = notifications.count("WATCHDOG=1")
            time.sleep(2)  # four ping intervals: none may come
            assert notifications.count("WATCHDOG=1") == before
        finally:
            os.kill(frozen, signal.SIGCONT)
        wait_until(lambda: notifications.count("WATCHDOG=1") > before, 10, "pings to resume")


def test_a_burst_of_sighups_leaves_one_serving_generation(workdir: Path) -> None:
    """60 SIGHUPs 30 ms apart, faster than a reload with 16 workers: the reloads coalesce
    instead of using up the scoreboard's slots, and a later SIGHUP still works."""
    with (
        run_backend("echo") as backend,
        run_proxy(
            ["-w", "16", backend.target], workdir, listeners=METRICS_LISTENERS, names=METRICS_NAMES
        ) as proxy,
    ):
        for _ in range(60):
            proxy.signal(signal.SIGHUP)
            time.sleep(0.03)  # the scenario: a burst, not synchronisation
        wait_until(lambda: converged(proxy), 60, "16 workers of one generation serving")
        before = set(proxy.workers())
        proxy.signal(signal.SIGHUP)
        wait_until(
            lambda: converged(proxy) and not set(proxy.workers()) & before,
            60,
            "one more rotation",
        )
        with proxy.connect() as client:
            assert send_all_then_read(client, b"after the burst") == b"after the burst"
    assert "a reload is already waiting to start" in proxy.stderr()


def test_a_storm_of_sighup_sigttin_and_sigttou_converges_to_the_target(workdir: Path) -> None:
    rng = random.Random(13)
    kinds = [signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU]
    with (
        run_backend("echo") as backend,
        run_proxy(
            ["-w", "3", backend.target], workdir, listeners=METRICS_LISTENERS, names=METRICS_NAMES
        ) as proxy,
    ):
        for _ in range(150):
            proxy.signal(rng.choice(kinds))
            time.sleep(0.01)  # the scenario: a storm, not synchronisation
        wait_until(lambda: converged(proxy), 60, "as many workers as the target, serving")
        target = gauges(proxy)["forkproxy_workers_target"]
        assert 1 <= target < 128
        with proxy.connect() as client:
            assert send_all_then_read(client, b"after the storm") == b"after the storm"
    assert "already at the most workers" not in proxy.stderr()


def test_fresh_workers_killed_from_outside_do_not_stop_the_service(workdir: Path) -> None:
    """Five SIGKILLs of workers within seconds of their start (an OOM killer's doing) are
    not a crash loop: the service goes on and the last replacement serves."""
    with run_backend("echo") as backend, run_proxy(["-w", "1", backend.target], workdir) as proxy:
        killed: list[int] = []
        for _ in range(6):
            wait_until(lambda: len(set(proxy.workers()) - set(killed)) == 1, 10, "a fresh worker")
            (victim,) = set(proxy.workers()) - set(killed)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
        wait_until(
            lambda: (
                len(set(proxy.workers()) - set(killed)) == 1 or proxy.process.poll() is not None
            ),
            10,
            "a replacement",
        )
        assert proxy.process.poll() is None, proxy.stderr()
        with proxy.connect() as client:
            assert send_all_then_read(client, b"still here") == b"still here"
        assert proxy.stop() == 0
    assert "workers keep dying" not in proxy.stderr()
