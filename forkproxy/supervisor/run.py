"""What `forkproxy` runs once its settings are parsed: a master, or one relayed connection.

Accept=yes passes the connection itself (LISTEN_FDS=1, a connected socket) and --inetd
puts it on standard input (StandardInput=socket); `oneshot` relays either in this
process. Anything else is a listener for a `Master` and its workers.
"""

import signal

from forkproxy import logs
from forkproxy.errors import ForkproxyError
from forkproxy.relay.engine import engine_name, log_python_fallback
from forkproxy.settings.config import Config
from forkproxy.settings.kinds import STREAM, kind_mismatch
from forkproxy.shared.listener import is_connection
from forkproxy.supervisor.activation import INETD_FD, passed_fds
from forkproxy.supervisor.master import Master
from forkproxy.supervisor.notify import Notifier
from forkproxy.supervisor.signals import MASTER_SIGNALS


def run(config: Config, argv: list[str] | None = None, config_text: str | None = None) -> int:
    """Run forkproxy until it stops; return the process exit status. `argv` and the
    --config file's `config_text` are what it runs with, for a reload."""
    logs.setup(config.log_level)
    engine_name()  # FORKPROXY_ENGINE=c without the compiled engine: a one-line error now
    if config.inetd:
        # StandardInput=socket: a connection (Accept=yes) or a listener (Accept=no).
        if is_connection(INETD_FD):
            return _relay_connection(config, INETD_FD, "standard input (--inetd)")
        passed = [(INETD_FD, "unknown")]
    else:
        passed = passed_fds()
    if len(passed) == 1 and is_connection(passed[0][0]):
        # Accept=yes: systemd accepted the client and passed the connection itself.
        return _relay_connection(config, passed[0][0], f"fd {passed[0][0]} from systemd")
    log_python_fallback(config)
    master = Master(config, passed, argv, config_text)
    try:
        return master.run()
    finally:
        master.close()


def _relay_connection(config: Config, fd: int, what: str) -> int:
    why = kind_mismatch(STREAM, config.targets + config.backup)
    if why is None and config.access_log:
        why = "--access-log is written by workers, and a passed connection has none"
    if why is None and config.accept_proxy:
        why = "--accept-proxy is read by workers, and a passed connection has none"
    if why is not None:
        raise ForkproxyError(f"cannot relay the stream connection on {what}: {why}")
    # Imported here: the one-shot relay needs uvloop, which a master never loads (the
    # workers it forks load their own, so they do not start with a copy of it).
    from forkproxy.oneshot import relay_connection

    # cli.main blocked the master's signals; one connection keeps their default actions.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
    notifier = Notifier()
    try:
        return relay_connection(config, fd, what, notifier)
    finally:
        notifier.close()
