"""Which relay engine the workers run: the one place that names it.

Today every worker runs the Python engine (relay/); the compiled one (csrc/, built as
forkproxy.relay._engine) is not wired in yet. `forkproxy_build_info{engine}` and a
reload's log read `engine_name()`, so the engine's selection changes only this module.
Never imports the compiled engine itself.
"""

PYTHON = "python"


def engine_name() -> str:
    """The engine the workers this process starts run: "python" (the compiled one's
    selection, FORKPROXY_ENGINE, comes with its integration)."""
    return PYTHON
