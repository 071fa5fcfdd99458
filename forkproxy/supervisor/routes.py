"""The start-up line that says where each listener's clients go, bounded in length.

`startup_line` names every listener (its name, if it has one, and its address) and its
targets, as `forkproxy --check` does, on one line that a huge configuration cannot make
endless: past a budget the rest is counted ("and 40 more"). Pure: never logs or opens
anything.
"""

from collections.abc import Sequence

from forkproxy.settings.address import TargetAddress
from forkproxy.shared.listener import Listener

ROUTES_BUDGET = 1000  # characters of routes on the start-up line
TARGETS_BUDGET = 200  # characters of one listener's targets


def listener_text(listener: Listener) -> str:
    """'web' 127.0.0.1:8080, or fd 3 'web' (127.0.0.1:8080) when systemd named it."""
    if listener.name and f"'{listener.name}'" not in listener.label:
        return f"'{listener.name}' {listener.label}"
    return listener.label


def startup_line(
    routes: Sequence[tuple[Listener, Sequence[TargetAddress]]],
    workers: int,
    connections_max: int,
) -> str:
    """relaying LISTENER -> TARGET, ...; ... with N workers, at most M connections."""
    texts = [
        f"{listener_text(listener)} -> "
        + (bounded_list([target.text for target in targets], ", ", TARGETS_BUDGET) or "no target")
        for listener, targets in routes
    ]
    return (
        f"relaying {bounded_list(texts, '; ', ROUTES_BUDGET)} with {workers} "
        f"worker{'' if workers == 1 else 's'}, at most {connections_max} connections"
    )


def bounded_list(items: Sequence[str], separator: str, budget: int) -> str:
    """`items` joined by `separator`, the ones past `budget` characters counted instead
    ("and 3 more"); the first item is always shown whole."""
    shown: list[str] = []
    used = 0
    for index, item in enumerate(items):
        if shown and used + len(separator) + len(item) > budget:
            return separator.join(shown) + f" and {len(items) - index} more"
        used += len(item) + (len(separator) if shown else 0)
        shown.append(item)
    return separator.join(shown)
