"""Processes the runner starts, each in its own session, and the loopback ports they take.

A process group is stopped by its id, SIGTERM then SIGKILL. Never signals a process it did
not start, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
STOP_GRACE_TIMEOUT = 5.0


class ProcessGroup:
    """One command started in a new session, so its pid is also its process group id.

    Everything it forks (nginx and forkproxy workers) stays in that group unless it calls
    setsid() itself, which none of the contenders do; `stop()` signals the whole group.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout_pipe: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        # The log file is ours; the child gets a dup of it.
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=stdin,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                cwd=cwd,
                env=env,
                start_new_session=True,
                text=stdout_pipe,
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self, grace_timeout: float = STOP_GRACE_TIMEOUT) -> None:
        """SIGTERM the group, wait for the leader to the grace deadline, then SIGKILL it."""
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace_timeout)
        # Workers may outlive their master for a moment; the group id still names them.
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace_timeout)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                stream.close()

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)


class Registry:
    """Every group the runner started, so an interrupted run still stops them all."""

    def __init__(self) -> None:
        self._groups: list[ProcessGroup] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout_pipe: bool = False,
    ) -> ProcessGroup:
        group = ProcessGroup(
            name, argv, log_path, cwd=cwd, env=env, stdin=stdin, stdout_pipe=stdout_pipe
        )
        self._groups.append(group)
        return group

    def stop(self, group: ProcessGroup) -> None:
        group.stop()
        if group in self._groups:
            self._groups.remove(group)

    def stop_all(self) -> None:
        while self._groups:
            self._groups.pop().stop()


def free_port() -> int:
    """A port the kernel just gave to a loopback bind; nginx and HAProxy need a number."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])
