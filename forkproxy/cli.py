"""The `forkproxy` command: argv to settings, then run; an error becomes one stderr line.

Parsing is `settings.arguments`, running is `supervisor.run`. A `ForkproxyError` is
printed as `forkproxy: <message>` with exit status 1, as systemd-socket-proxyd's errors
are; anything else is a bug and keeps its traceback.
"""

import signal
import sys
from typing import NoReturn

from forkproxy.errors import ForkproxyError
from forkproxy.settings.arguments import parse_args
from forkproxy.settings.quoting import printable
from forkproxy.supervisor.signals import MASTER_SIGNALS

EXIT_FAILURE = 1


def main(argv: list[str] | None = None) -> NoReturn:
    """Console entry point: run forkproxy and exit with its status."""
    signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)  # see supervisor/signals.py
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        from forkproxy.supervisor.run import run  # after parsing: --help stays fast

        status = run(config)
    except ForkproxyError as error:
        # One line whatever the message quotes: no newline or terminal escape gets out.
        print(f"forkproxy: {printable(str(error))}", file=sys.stderr)
        sys.exit(EXIT_FAILURE)
    sys.exit(status)
