"""A reload (SIGHUP, SIGUSR2): check the installed code and the settings, then re-execute
the master in place, same PID, handing everything it holds to the new image.

1. Coalesced: asked for while one runs (or before the first READY=1, or before the new
   image's workers serve), one more starts once it is done; more are ignored.
2. Checked first, without blocking the loop: the command forkproxy was started with, now
   with --check (the code installed now, the --config file as it is now), runs as a child
   with a clean signal mask and no LISTEN_*/NOTIFY_SOCKET; its output comes through a pipe
   on the selector, its exit through SIGCHLD. It names the state format and the shared
   memory layout it would use (reexec_state.check_marker); another layout means a restart
   is needed. A failed check is logged line by line and counted; nothing changes.
3. RELOADING=1 and MONOTONIC_USEC=, the state in a memfd (reexec_state.py), its
   descriptors inheritable for the exec only, the master's signals blocked (pending ones
   wait for the new image), and execve(2) of the same command. If the exec fails, all is
   undone and the reload counted as failed. The new image is takeover.py.
Never forks workers and never touches the shared mapping.
"""

import logging
import math
import os
import selectors
import signal
import sys
import time
from collections.abc import Mapping
from typing import Protocol

from forkproxy.shared.layout import LAYOUT_VERSION
from forkproxy.supervisor.notify import Notifier
from forkproxy.supervisor.reexec_state import (
    CHECK_VARIABLE,
    STATE_FORMAT,
    STATE_VARIABLE,
    ReexecState,
    parse_check_marker,
    write_state,
)
from forkproxy.supervisor.respawn import describe_exit
from forkproxy.supervisor.signals import MASTER_SIGNALS

log = logging.getLogger("forkproxy")

CHECK_TIMEOUT = 60.0  # seconds for the check, host-name lookups included
MAX_CHECK_OUTPUT = 64 * 1024  # bytes of the check's output kept (more is dropped)
# Variables the check must not see: they are the master's (sockets, notifications).
_NOT_FOR_THE_CHECK = (
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    STATE_VARIABLE,
)


class ReloadHost(Protocol):
    """What the reloader asks of the master."""

    def reload_ready(self) -> bool:
        """Whether the workers serve (READY=1 sent), so that a reload may start now."""

    def reload_stopping(self) -> bool:
        """Whether the master is stopping (no reload then)."""

    def before_exec(self) -> bool:
        """Signals are blocked: handle those already received; False if one stops us."""

    def reexec_state(self, started: float, pending: bool) -> ReexecState:
        """Everything the new image takes over."""


class Reloader:
    """The reload state machine of one master image, and the reload counters."""

    def __init__(
        self,
        host: ReloadHost,
        selector: selectors.BaseSelector,
        notifier: Notifier,
        argv: list[str],
        notify_environment: Mapping[str, str],
    ) -> None:
        self.host = host
        self.selector = selector
        self.notifier = notifier
        self.command = reexec_command(argv)
        self.notify_environment = dict(notify_environment)  # put back for the new image
        self.ok = 0
        self.failed = 0
        self.last_success: float | None = None  # time.time() of the last reload that served
        self.pending = False  # asked for again meanwhile: one more after this one
        self.started = 0.0  # when the running (or taken over) reload was asked for
        self.taking_over = False  # this image's workers do not serve the reload yet
        self.executing = False  # between a passed check and the exec (or its failure)
        self.check_pid = 0
        self.check_output: int | None = None  # the pipe's read end
        self.check_status: int | None = None
        self.check_text = bytearray()
        self.check_deadline = math.inf

    @property
    def busy(self) -> bool:
        """A check runs (or its child is not reaped yet)."""
        return self.check_pid != 0

    # -- asking ----------------------------------------------------------------------------

    def request(self, signum: int) -> None:
        """SIGHUP or SIGUSR2."""
        name = signal.Signals(signum).name
        if self.host.reload_stopping():
            log.info("stopping: ignoring %s", name)
            return
        if self.busy or self.executing or self.taking_over or not self.host.reload_ready():
            if self.pending:
                log.info("a reload is already waiting to start, ignoring %s", name)
            else:
                self.pending = True
                log.info("%s: reloading once the running start or reload is done", name)
            return
        log.info("%s: reloading", name)
        self._start_check(time.monotonic())

    def on_serving(self) -> None:
        """Every current worker serves: a reload taken over is done; one asked for
        meanwhile starts."""
        if self.taking_over:
            self.taking_over = False
            self.count_ok()
            log.info(
                "reload done: %.0f ms after it was asked for",
                (time.monotonic() - self.started) * 1000,
            )
        if self.pending and not self.busy and not self.host.reload_stopping():
            self.pending = False
            log.info("starting the reload asked for meanwhile")
            self._start_check(time.monotonic())

    def count_ok(self) -> None:
        self.ok += 1
        self.last_success = time.time()

    def count_failed(self) -> None:
        self.failed += 1

    def cancel(self) -> None:
        """The master stops: no reload any more; a running check is killed."""
        self.pending = False
        if self.check_pid and self.check_status is None:
            try:
                os.kill(self.check_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close_in_child(self) -> None:
        """In a new worker: the check's output is the master's."""
        if self.check_output is not None:
            os.close(self.check_output)
            self.check_output = None

    # -- the check -------------------------------------------------------------------------

    def _start_check(self, started: float) -> None:
        self.started = started
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(write_end, True)
        environment = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_THE_CHECK}
        environment[CHECK_VARIABLE] = "1"
        try:
            pid = os.posix_spawn(
                sys.executable,
                self.check_command(),
                environment,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, write_end, 1),
                    (os.POSIX_SPAWN_DUP2, write_end, 2),
                ],
                setsigmask=(),  # none blocked, whatever the master's mask
                setsigdef=(*MASTER_SIGNALS, signal.SIGPIPE),
            )
        except OSError as error:
            os.close(read_end)
            log.error("reload failed: cannot run the check (%s): %s", sys.executable, error)
            self._failed()
            return
        finally:
            os.close(write_end)
        self.check_pid = pid
        self.check_output = read_end
        self.check_status = None
        self.check_text = bytearray()
        self.check_deadline = time.monotonic() + CHECK_TIMEOUT
        self.selector.register(read_end, selectors.EVENT_READ, self._on_output)

    def check_command(self) -> list[str]:
        prefix, argv = self.command
        return [*prefix, "--check", *argv]

    def on_child_exit(self, pid: int, status: int) -> None:
        """A child that is not a worker was reaped."""
        if pid != self.check_pid:
            return
        self.check_status = status
        self._maybe_done()

    def _on_output(self) -> None:
        assert self.check_output is not None
        try:
            data = os.read(self.check_output, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.check_text += data[: max(0, MAX_CHECK_OUTPUT - len(self.check_text))]
            return
        self.selector.unregister(self.check_output)
        os.close(self.check_output)
        self.check_output = None
        self._maybe_done()

    def next_deadline(self) -> float:
        return self.check_deadline

    def run_deadlines(self, now: float) -> None:
        if now >= self.check_deadline:
            self.check_deadline = math.inf
            log.error("reload: the check did not finish within %gs, killing it", CHECK_TIMEOUT)
            try:
                os.kill(self.check_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _maybe_done(self) -> None:
        """Both the exit and the end of the output are in: judge the check."""
        if self.check_status is None or self.check_output is not None:
            return
        status, text = self.check_status, self.check_text.decode(errors="replace")
        self.check_pid, self.check_status, self.check_deadline = 0, None, math.inf
        if self.host.reload_stopping():
            return  # killed by `cancel`
        marker, reports, errors = judge_check(status, text)
        for line in errors:
            log.error("reload failed: %s", line)
        if marker is None:
            self._failed()
            return
        for line in reports:
            log.info("reload: %s", line)
        self._exec(marker)

    def _failed(self) -> None:
        self.count_failed()
        if self.pending and not self.host.reload_stopping():
            self.pending = False
            log.info("starting the reload asked for meanwhile")
            self._start_check(time.monotonic())

    # -- the exec --------------------------------------------------------------------------

    def _exec(self, marker: Mapping[str, str]) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        self.executing = True  # a SIGHUP handled now waits for the new image
        try:
            go = self.host.before_exec()
        finally:
            self.executing = False
        if not go:  # a stop came meanwhile
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
            return
        # Blocked across the exec, so that they wait for the new image's handlers: after
        # execve(2) their action is the default one, which ends a process for most.
        signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        self.notifier.reloading("reloading")
        state = self.host.reexec_state(self.started, self.pending)
        try:
            state_fd = write_state(state)
        except OSError as error:
            self._exec_failed(f"cannot write the state: {error.strerror}", [])
            return
        descriptors = [*state.descriptors(), state_fd]
        environment = {**os.environ, **self.notify_environment, STATE_VARIABLE: str(state_fd)}
        for fd in descriptors:
            os.set_inheritable(fd, True)
        prefix, argv = self.command
        log.info(
            "reload: re-executing as forkproxy %s (engine %s)",
            marker.get("version", "?"),
            marker.get("engine", "?"),
        )
        try:
            os.execve(sys.executable, [*prefix, *argv], environment)
        except OSError as error:
            self._exec_failed(f"cannot execute {sys.executable}: {error.strerror}", descriptors)
            os.close(state_fd)

    def _exec_failed(self, reason: str, descriptors: list[int]) -> None:
        for fd in descriptors:
            os.set_inheritable(fd, False)
        log.error("reload failed: %s", reason)
        self.notifier.ready("reload failed")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        self._failed()


def judge_check(status: int, text: str) -> tuple[dict[str, str] | None, list[str], list[str]]:
    """What a reload's check, which exited with wait `status` and wrote `text`, says:
    the marker of the code it ran (None: the reload fails), its other lines, and why the
    reload fails."""
    lines = [line for line in text.splitlines() if line.strip()]
    marker = parse_check_marker(lines)
    # cli's error lines start with "forkproxy: "; the log says who it is already.
    reports = [
        line.removeprefix("forkproxy: ") for line in lines if parse_check_marker([line]) is None
    ]
    if os.waitstatus_to_exitcode(status) != 0:
        return None, [], reports or [f"the check {describe_exit(status)}"]
    if marker is None or marker.get("state") != str(STATE_FORMAT):
        why = "restart needed: the installed forkproxy cannot take over from this one"
        return None, reports, [why]
    if marker.get("layout") != str(LAYOUT_VERSION):
        why = (
            f"restart needed: shared memory layout changed (this one's is {LAYOUT_VERSION}, "
            f"forkproxy {marker.get('version', '?')}'s {marker.get('layout', '?')})"
        )
        return None, reports, [why]
    return marker, reports, []


def reexec_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """How this process was started: the interpreter's command line up to forkproxy's own
    arguments (a console script, `python -m forkproxy`, a launcher script), and those
    arguments. Both the check and the exec run that again: the code installed now."""
    original = list(getattr(sys, "orig_argv", []))
    if argv and len(original) > len(argv) and original[-len(argv) :] == argv:
        return original[: -len(argv)], list(argv)
    return [sys.executable, "-m", "forkproxy"], list(argv)
