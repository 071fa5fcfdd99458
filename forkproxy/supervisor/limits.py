"""The file descriptor limit: raised to the hard limit at start, and a worker's reserve.

systemd sets a low soft RLIMIT_NOFILE and a high hard one, and expects a daemon that
needs more to raise its own soft limit (systemd.exec(5), LimitNOFILE=). Raising is
best effort: a failure is a warning, and the limit in force is returned.
"""

import logging
import resource

from forkproxy.shared.protocol import PIPE_POOL_KEEP

log = logging.getLogger("forkproxy")

FD_RESERVE = 2 * PIPE_POOL_KEEP + 32  # descriptors a worker needs besides its connections


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one, as systemd expects daemons to."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as nr_open:
                hard = int(nr_open.read())
        except (OSError, ValueError):
            return soft
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as error:
            log.warning("cannot raise the file descriptor limit to %d: %s", hard, error)
    return soft


def check_fd_limit(fd_limit: int, connections_max: int) -> None:
    """Warn if a worker could need more descriptors than `fd_limit` allows."""
    needed = 2 * connections_max + FD_RESERVE
    if needed > fd_limit:
        log.warning(
            "--connections-max=%d needs up to %d file descriptors in one worker "
            "(2 per connection, more while data is in flight) but the limit is %d; "
            "connections beyond it will fail (raise LimitNOFILE=)",
            connections_max,
            needed,
            fd_limit,
        )
