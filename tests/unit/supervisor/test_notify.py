"""sd_notify(3) datagrams, to a path or an abstract socket; silent when unset."""

import os
import socket
from pathlib import Path

from forkproxy.supervisor.notify import Notifier, watchdog_interval


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _receiver(path) as receiver:
        environ = {"NOTIFY_SOCKET": path}
        notifier = Notifier(environ)
        assert "NOTIFY_SOCKET" not in environ  # does not leak to children
        notifier.ready("1 worker")
        notifier.stopping("bye")
        notifier.watchdog()
        assert receiver.recv(100) == b"READY=1\nSTATUS=1 worker"
        assert receiver.recv(100) == b"STOPPING=1\nSTATUS=bye"
        assert receiver.recv(100) == b"WATCHDOG=1"
        notifier.close()


def test_abstract_socket() -> None:
    name = f"forkproxy-notify-test-{os.getpid()}"
    with _receiver("\0" + name) as receiver:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.status("ok")
        assert receiver.recv(100) == b"STATUS=ok"
        notifier.close()


def test_unset_or_gone_is_silent(tmp_path: Path) -> None:
    Notifier({}).ready("x")  # nothing to send to
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    notifier.ready("x")  # ECONNREFUSED/ENOENT must not escape
    notifier.close()


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


def test_a_manager_that_stopped_reading_never_blocks_the_master(tmp_path: Path) -> None:
    """Once the manager's queue is full (net.unix.max_dgram_qlen, 10 by default
    without systemd's sysctl), a blocking sendto() would hang the master for good: no
    reaping, no SIGTERM, no metrics. Messages are dropped instead."""
    import threading

    path = str(tmp_path / "notify")
    with _receiver(path):  # never read
        notifier = Notifier({"NOTIFY_SOCKET": path})
        sender = threading.Thread(
            target=lambda: [notifier.status(f"{n} active") for n in range(1000)], daemon=True
        )
        sender.start()
        sender.join(10)
        blocked = sender.is_alive()
    sender.join(10)  # the receiver is gone: a blocked sendto() fails now
    notifier.close()
    assert not blocked, "Notifier.status() blocked on a full $NOTIFY_SOCKET queue"
