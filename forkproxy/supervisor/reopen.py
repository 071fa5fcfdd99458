"""SIGUSR1 in the master: have the workers reopen their access-log files.

The workers write the files (relay/access_log.py); the master only checks first that
every path can be opened, so a rotation that removed a directory or broke permissions
is one error here and the workers keep writing to the files they have. Never opens a
file for longer than that check.
"""

import logging
import signal
from collections.abc import Iterable

from forkproxy.errors import ForkproxyError
from forkproxy.relay.access_log import access_log_paths, check_access_logs
from forkproxy.settings.config import Config
from forkproxy.supervisor.worker_record import WorkerProcess

log = logging.getLogger("forkproxy")


def reopen_access_logs(config: Config, workers: Iterable[WorkerProcess]) -> None:
    """SIGUSR1: forward it to every worker, once each access-log path can be opened."""
    if not access_log_paths(config):
        log.info("SIGUSR1: no log files to reopen")
        return
    try:
        check_access_logs(config)
    except ForkproxyError as error:
        log.error("SIGUSR1: %s; the workers keep the files they have", error)
        return
    log.info("SIGUSR1: reopening the access log files")
    for worker in workers:
        worker.send(signal.SIGUSR1)
