"""Which relay engine the workers run: the one place that decides and names it.

The compiled engine (csrc/, built as forkproxy.relay._engine when a C compiler and
Python's headers were there at install) relays a worker's stream listeners (TCP, unix
stream: compiled.py) and datagram listeners (UDP, unix datagram: compiled_datagram.py);
the Python one (accepting.py, connecting.py, splice.py, datagram.py) is the reference,
and relays everything the compiled one does not: sequential-packet listeners in either
mode, datagram listeners with a host-name target, and every listener of a worker whose
settings use a feature the compiled engine lacks (`engine_supports`).

FORKPROXY_ENGINE=python forces the Python engine; FORKPROXY_ENGINE=c requires the
compiled one (a one-line error at start-up if it is missing); unset, the compiled one
runs when it imports. `forkproxy --version`, `forkproxy_build_info{engine}` and a worker
all read `engine_name()`. Never relays anything itself.
"""

import logging
import os
import socket
from types import ModuleType

from forkproxy.errors import ForkproxyError
from forkproxy.relay.failpoints import FAILPOINT, WORKER_CRASH, failpoint_from_environment
from forkproxy.settings.config import Config

log = logging.getLogger("forkproxy")

ENGINE_VARIABLE = "FORKPROXY_ENGINE"
PYTHON = "python"
C = "c"

# What the compiled engine's configuration holds at most (csrc/engine.h).
_MAX_TARGETS_PER_ROUTE = 65535


def compiled_module() -> ModuleType | None:
    """forkproxy.relay._engine, or None if it was not built (or does not load). Python's
    import system keeps a loaded module: asking again costs a lookup."""
    try:
        from forkproxy.relay import _engine
    except ImportError:
        return None
    return _engine


def engine_name() -> str:
    """The engine workers run: "c" or "python". ForkproxyError if FORKPROXY_ENGINE asks
    for one that cannot run."""
    wanted = os.environ.get(ENGINE_VARIABLE, "")
    if wanted == PYTHON:
        return PYTHON
    if wanted == C:
        if compiled_module() is None:
            raise ForkproxyError(
                f"{ENGINE_VARIABLE}=c but the compiled engine is not installed (it is built "
                "when forkproxy is installed with a C compiler and Python's headers); unset "
                f"{ENGINE_VARIABLE} or set it to python"
            )
        return C
    if wanted:
        raise ForkproxyError(f"{ENGINE_VARIABLE} must be c or python, got '{wanted}'")
    return C if compiled_module() is not None else PYTHON


def engine_supports(config: Config) -> str | None:
    """Why the compiled engine cannot relay this configuration's stream and datagram
    listeners (a worker then runs the Python engine for all of them), or None if it can."""
    for settings in (config.global_settings(), *config.listeners):
        if len(settings.targets) > _MAX_TARGETS_PER_ROUTE:
            return f"more than {_MAX_TARGETS_PER_ROUTE} targets for one listener"
        # Balancing the compiled engine does not do (relay/balance.py does).
        if settings.balance not in ("round-robin", "first"):
            return f"--balance={settings.balance}"
        if settings.backup:
            return "--backup"
        if settings.connect_retry > 0:
            return "--connect-retry"
        # The compiled engine does not read PROXY headers yet (csrc/ has the parser, not
        # wired into its relay).
        if settings.accept_proxy:
            return "--accept-proxy"
    if config.log_level == "debug":
        # The per-connection lines (how each one ended) are the Python engine's.
        return "--log-level=debug (a line per connection)"
    failpoint = failpoint_from_environment()
    if failpoint is not None and failpoint.stage != WORKER_CRASH:
        # Faults injected into the Python engine's callbacks (tests only).
        return f"{FAILPOINT}={failpoint.stage}"
    return None


def log_python_fallback(config: Config) -> None:
    """Say why the workers relay this configuration's listeners with Python
    although the compiled engine runs (`engine_supports`), if they do. The master says
    it once, at start and in a reload's new image; each worker finds the same reason."""
    if engine_name() != C:
        return
    if (reason := engine_supports(config)) is not None:
        log.info("the compiled engine does not support %s: relaying with Python", reason)
    elif (name := _datagram_host_name(config)) is not None:
        log.info(
            "datagram target '%s' is a host name, resolved per session by the Python "
            "engine: the datagram listeners are read with Python",
            name,
        )


def _datagram_host_name(config: Config) -> str | None:
    """A datagram target of these settings that is a host name, if any: a worker then
    reads its datagram listeners with Python (relay/compiled_datagram.py)."""
    for settings in (config.global_settings(), *config.listeners):
        for target in settings.targets:
            if target.kind == socket.SOCK_DGRAM and target.needs_resolving:
                return target.text
    return None


def version_text(version: str) -> str:
    """`forkproxy --version`'s line: the version and the engine the workers run."""
    return f"forkproxy {version} (engine: {engine_name()})"
