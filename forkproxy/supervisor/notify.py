"""`Notifier`: READY, STATUS, RELOADING, STOPPING and WATCHDOG datagrams to $NOTIFY_SOCKET.

The sd_notify(3) protocol written out: one datagram per message to the AF_UNIX socket
named by $NOTIFY_SOCKET (a path, or "@name" for the abstract namespace). A no-op when
the variable is unset. Never raises into its caller: a supervisor that stopped
listening must not take the proxy down.
"""

import logging
import os
import socket
import time

log = logging.getLogger("forkproxy")


class Notifier:
    """Owns one datagram socket to the service manager for the life of the master."""

    def __init__(self, environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
        address = environ.pop("NOTIFY_SOCKET", "")
        self._address: str | None = None
        self._socket: socket.socket | None = None
        if address.startswith("@"):
            address = "\0" + address[1:]
        if address.startswith(("/", "\0")):
            self._address = address
            # Non-blocking: with the manager's queue full, a blocking sendto()
            # would hang the master for good; a message that does not fit is dropped.
            self._socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        elif address:
            log.warning("ignoring $NOTIFY_SOCKET '%s': not a unix socket address", address)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, message: str) -> None:
        if self._socket is None or self._address is None:
            return
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as error:
            log.debug("cannot notify the service manager (%s): %s", message, error)

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def reloading(self, status: str) -> None:
        """A reload begins: READY=1 again once it is done (Type=notify-reload, from
        systemd 253; earlier ones take RELOADING=1 alone and ignore MONOTONIC_USEC)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS={status}")

    def stopping(self, status: str) -> None:
        self.notify(f"STOPPING=1\nSTATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


# What systemd tells the master about itself; the Notifier and watchdog_interval() remove
# them from the environment, a reload puts them back for the new image.
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def notify_environment(environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    """The NOTIFY_VARIABLES set in `environ` (before the Notifier takes them)."""
    return {name: environ[name] for name in NOTIFY_VARIABLES if name in environ}


def watchdog_interval(environ: dict[str, str] | os._Environ[str] = os.environ) -> float | None:
    """The WatchdogSec= systemd asks us to keep (sd_watchdog_enabled(3)), or None.

    Honoured only when $WATCHDOG_PID is absent or ours; the variables are removed so
    they cannot leak into anything we start.
    """
    usec_text = environ.pop("WATCHDOG_USEC", "")
    pid_text = environ.pop("WATCHDOG_PID", "")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
        if pid_text and int(pid_text) != os.getpid():
            return None
    except ValueError:
        log.warning("ignoring invalid $WATCHDOG_USEC/$WATCHDOG_PID")
        return None
    return usec / 1_000_000 if usec > 0 else None
