"""Which signals the master handles, as one set the command line can block early.

`cli.main` blocks MASTER_SIGNALS before it does anything else, so a signal an admin sends
while Python imports and parses (SIGHUP, SIGUSR1: their default action ends the process)
waits for the master's loop instead of killing a half-started service. `Master.run`
unblocks them once its handlers are in place; the one-shot path unblocks them before it
relays (supervisor/run.py).
"""

import signal

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
