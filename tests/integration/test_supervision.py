"""The master supervises: idle exit, rotation and scaling under load, hung and dead
workers, a crash loop, its own death, and the systemd watchdog."""

import os
import signal
import socket
import subprocess
import threading
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


class RequestLoad:
    """`clients` threads, each looping connect / request / full reply / close."""

    def __init__(self, proxy, clients: int = 20) -> None:
        self.proxy = proxy
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, index: int) -> None:
        payload = b"request %d " % index * 50
        while not self.stop.is_set():
            try:
                with self.proxy.connect(timeout=10) as client:
                    reply = send_all_then_read(client, payload)
                if reply != payload:
                    raise AssertionError(f"got {len(reply)} bytes back, sent {len(payload)}")
                with self.lock:
                    self.ok += 1
            except (OSError, AssertionError) as error:
                with self.lock:
                    self.failures.append(repr(error))

    def __enter__(self) -> "RequestLoad":
        for thread in self.threads:
            thread.start()
        wait_until(lambda: self.ok >= 100, 20, "the load to get going")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def more(self, count: int = 200) -> None:
        """Let at least `count` more requests complete."""
        target = self.ok + count
        wait_until(lambda: self.ok >= target, 30, f"{count} more requests")


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
