"""The shared mapping as the master sets it up, for unit tests of what processes share.

`make_shared` creates the memfd mapping, sets up the caps and prepares `slots` scoreboard
slots (so they count towards the caps), as `supervisor.master` does before forking.
"""

from dataclasses import dataclass

from forkproxy.shared.admission import Admission
from forkproxy.shared.layout import source_entries
from forkproxy.shared.mapping import SharedMapping
from forkproxy.shared.scoreboard import Scoreboard


@dataclass
class Shared:
    mapping: SharedMapping
    scoreboard: Scoreboard
    admission: Admission

    def close(self) -> None:
        self.scoreboard.close()
        self.mapping.close()


def make_shared(
    capacity: int, per_source: int = 0, slots: int = 2, connections_max: int = 0
) -> Shared:
    """A mapping for a cap of `capacity` (its per-source table sized for
    `connections_max`, default the cap), with slots [0, slots) prepared."""
    mapping = SharedMapping.create(source_entries(connections_max or capacity))
    admission = Admission.set_up(mapping, capacity, per_source)
    scoreboard = Scoreboard(mapping)
    for slot in range(slots):
        scoreboard.prepare(slot, 0, 0)
    return Shared(mapping, scoreboard, admission)
