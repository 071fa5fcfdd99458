"""Which signals the master handles, and how they reach its loop (`SignalWakeup`).

`cli.main` blocks MASTER_SIGNALS before it does anything else, so a signal an admin sends
while Python imports and parses (SIGHUP, SIGUSR1: their default action ends the process)
waits for the master's loop instead of killing a half-started service. `Master.run`
unblocks them once its handlers are in place; the one-shot path unblocks them before it
relays (supervisor/run.py). Never decides what a signal does: the master's table does.
"""

import logging
import signal
import socket
from collections.abc import Callable, Mapping
from functools import partial

log = logging.getLogger("forkproxy")

# Signals an admin may send that have no use here yet. Their default action would end the
# master (SIGWINCH's and SIGURG's: nothing), so the master takes them and logs each once.
UNUSED_SIGNALS = (
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,  # also SIGPOLL
    signal.SIGPWR,
    signal.SIGWINCH,
    signal.SIGURG,
)
# When one wakeup brings several signals, stops are handled first and SIGCHLD last. A
# SIGTERM to the whole process group also stops idle workers at once; the kernel runs the
# handler of the higher-numbered of two pending signals first, so the workers' SIGCHLD can
# come before the SIGTERM, and their exits would read as deaths to replace.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})

MASTER_SIGNALS = frozenset(
    {
        *STOP_SIGNALS,
        signal.SIGCHLD,
        signal.SIGHUP,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGUSR1,
        signal.SIGUSR2,
        *UNUSED_SIGNALS,
    }
)


def unused_signal_table() -> dict[int, Callable[[], None]]:
    """Callbacks for UNUSED_SIGNALS: each is logged the first time only."""
    logged: set[int] = set()

    def on_unused_signal(signum: int) -> None:
        if signum not in logged:
            logged.add(signum)
            log.info("ignoring %s (logged once)", signal.Signals(signum).name)

    return {signum: partial(on_unused_signal, signum) for signum in UNUSED_SIGNALS}


class SignalWakeup:
    """How a signal reaches the master's loop: handlers that do nothing, the signal
    numbers written to a socket (signal.set_wakeup_fd), read back by the loop and handed
    to `table`'s callbacks, stops first and SIGCHLD last. Owns both sockets."""

    def __init__(self, table: Mapping[int, Callable[[], None]]) -> None:
        self.table = table
        self.read_end, self.write_end = socket.socketpair()
        for end in (self.read_end, self.write_end):
            end.setblocking(False)

    def install(self) -> None:
        """The wakeup fd and the do-nothing handlers, for every signal of the table."""
        signal.set_wakeup_fd(self.write_end.fileno(), warn_on_full_buffer=False)
        for signum in self.table:
            signal.signal(signum, _ignore_signal)

    def dispatch(self) -> None:
        """The read end is readable: run the callback of each signal received."""
        received = bytearray()
        while True:  # all of it: a full wakeup socket would drop signals
            try:
                data = self.read_end.recv(4096)
            except BlockingIOError:
                break
            if not data:
                break
            received += data
        for signum in sorted(received, key=_dispatch_rank):
            handler = self.table.get(signum)
            if handler is not None:
                handler()

    def close(self) -> None:
        """No wakeup fd any more (signals then only run the handlers), both ends closed;
        also what a new worker does with the master's."""
        signal.set_wakeup_fd(-1)
        self.read_end.close()
        self.write_end.close()


def _dispatch_rank(signum: int) -> int:
    """Order of handling within one wakeup: stops, then the rest, then SIGCHLD."""
    if signum in STOP_SIGNALS:
        return 0
    return 2 if signum == signal.SIGCHLD else 1


def _ignore_signal(signum: int, frame: object) -> None:
    """Python-level handler: the wakeup fd carries the signal to the master loop."""
