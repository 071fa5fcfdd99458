"""Log setup for journald or a terminal, the per-process tag, and rate-limited warnings.

journald credits every stderr line to the master's pid, so each worker tags its lines
("worker 2: ..."). Under journald ($JOURNAL_STREAM names our stderr) lines carry the
sd-daemon(3) "<N>" priority prefix and no timestamp (the journal keeps its own);
elsewhere they start with the date and time in UTC, ISO 8601 with milliseconds
(2026-12-07T16:54:08.123Z), and the level.
"""

import logging
import os
import sys
import time

LOGGER_NAME = "forkproxy"
# Between info and warning: normal but significant (syslog's notice), as a target that
# comes back up.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    NOTICE: 5,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _ProcessTag(logging.Filter):
    """Adds the worker tag and the syslog priority to every record."""

    def __init__(self) -> None:
        super().__init__()
        self.tag = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.tag = self.tag
        record.priority = _PRIORITIES.get(record.levelno, 6)
        return True


class _UtcFormatter(logging.Formatter):
    """Times as ISO 8601 in UTC with milliseconds: 2026-12-07T16:54:08.123Z."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{seconds}.{int(record.msecs):03d}Z"


def stderr_is_journal() -> bool:
    """True when $JOURNAL_STREAM names the device and inode of our stderr."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (int(device), int(inode)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


def setup(level: str) -> None:
    """Send forkproxy's log to stderr in the format its reader expects."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProcessTag())
    if stderr_is_journal():
        handler.setFormatter(logging.Formatter("<%(priority)d>%(tag)s%(message)s"))
    else:
        handler.setFormatter(_UtcFormatter("%(asctime)s %(levelname)s %(tag)s%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def set_process_tag(tag: str) -> None:
    """Prefix this process's lines with `tag` (e.g. "worker 2: ")."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        for log_filter in handler.filters:
            if isinstance(log_filter, _ProcessTag):
                log_filter.tag = tag


class RateLimitedLog:
    """Logs a repeating condition once per interval, with how often it happened.

    The first occurrence is logged at once; later ones within `interval` are counted
    and reported with the next line ("... (37 in the last 10s)").
    """

    __slots__ = ("_logger", "_level", "_interval", "_next_time", "_suppressed")

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0) -> None:
        self._logger = logger
        self._level = level
        self._interval = interval
        self._next_time = 0.0
        self._suppressed = 0

    def log(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next_time:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed + 1} in the last {self._interval:g}s)"
        self._suppressed = 0
        self._next_time = now + self._interval
        self._logger.log(self._level, message, *args)
