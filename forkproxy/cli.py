"""The `forkproxy` command: argv to settings, then run or check; errors become stderr lines.

Parsing is `settings.arguments`, running is `supervisor.run`, `--check` is
`supervisor.check`, the image a reload re-executed `supervisor.takeover`. A
`ForkproxyError` is printed as `forkproxy: <message>` on one line with exit status 1, as
systemd-socket-proxyd's errors are; --check prints every error found, one line each, and
exits 2, as `nginx -t` and `haproxy -c` fail. Anything else is a bug and keeps its
traceback.
"""

import os
import signal
import sys
from typing import NoReturn

from forkproxy import __version__
from forkproxy.errors import ForkproxyError, UsageErrors
from forkproxy.relay.engine import version_text
from forkproxy.settings.arguments import load_settings, wants_check
from forkproxy.settings.quoting import printable
from forkproxy.supervisor.reexec_state import STATE_VARIABLE
from forkproxy.supervisor.signals import MASTER_SIGNALS

EXIT_FAILURE = 1
EXIT_CHECK_FAILED = 2


def main(argv: list[str] | None = None) -> NoReturn:
    """Console entry point: run forkproxy (or check its settings) and exit with its status."""
    signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)  # see supervisor/signals.py
    if argv is None:
        argv = sys.argv[1:]
    check = wants_check(argv)
    try:
        if not check and STATE_VARIABLE in os.environ:  # a reload re-executed the master
            from forkproxy.supervisor.takeover import take_over

            taken = take_over(argv)
            if taken is not None:
                sys.exit(taken)
        config, config_text = load_settings(argv, version=lambda: version_text(__version__))
        if check:
            from forkproxy.supervisor.check import check_settings

            # No master will handle them: a SIGTERM during a slow lookup ends the check.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
            for line in check_settings(config):
                print(printable(line))
            sys.exit(0)
        from forkproxy.supervisor.run import run  # after parsing: --help stays fast

        status = run(config, argv, config_text)
    except ForkproxyError as error:
        lines = error.messages if check and isinstance(error, UsageErrors) else [str(error)]
        for line in lines:
            # One line whatever the message quotes: no newline or terminal escape gets out.
            print(f"forkproxy: {printable(line)}", file=sys.stderr)
        sys.exit(EXIT_CHECK_FAILED if check else EXIT_FAILURE)
    sys.exit(status)
