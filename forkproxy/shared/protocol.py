"""What a master hands a new worker, and the messages and exit statuses between them.

The protocol between the two processes, apart from the worker's code. The master imports
relay/worker.py at start (so every worker runs the code the master started with), but
uvloop and asyncio only load in each worker after fork, never in the master, whose memory
every worker would otherwise start with (a copy per worker of what only workers need).
"""

import signal
import struct
from dataclasses import dataclass

from forkproxy.settings.config import Config
from forkproxy.shared.admission import Admission
from forkproxy.shared.listener import Listener
from forkproxy.shared.scoreboard import Scoreboard
from forkproxy.shared.targets_table import ListenerTargets, TargetTable

# Exit statuses of a worker.
EXIT_OK = 0
EXIT_CANNOT_START = 3  # setup failed: respawning would fail the same way
EXIT_MASTER_GONE = 4

# Messages on the event pipe to the master: struct EVENT_FORMAT (slot, event). After a
# reload, workers of the old code write them to the new master: a change here needs a new
# state format (supervisor/reexec_state.py), so that a reload asks for a restart instead.
EVENT_FORMAT = "=HH"
EVENT_SIZE = struct.calcsize(EVENT_FORMAT)
EVENT_READY = 1  # the worker is accepting
EVENT_IDLE = 2  # the worker's last connection closed (sent only with --exit-idle-time)

# The signal the kernel sends a worker when its master dies (PR_SET_PDEATHSIG).
MASTER_DEATH_SIGNAL = signal.SIGUSR2

PIPE_POOL_KEEP = 64  # empty pipes a worker keeps for reuse, at most
# ... and at most this much pipe capacity: the kernel counts an empty pipe's size against
# the user's pipe limit (/proc/sys/fs/pipe-user-pages-soft) as if it were full.
PIPE_POOL_BYTES = 4 << 20


def pipe_pool_keep(pipe_size: int) -> int:
    """How many empty pipes of `pipe_size` bytes a worker keeps for reuse."""
    actual = 1 << (max(pipe_size, 4096) - 1).bit_length()  # the kernel's power of two
    return max(4, min(PIPE_POOL_KEEP, PIPE_POOL_BYTES // actual))


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What the master hands a new worker."""

    config: Config
    slot: int
    generation: int
    listeners: tuple[Listener, ...]
    scoreboard: Scoreboard
    admission: Admission  # the caps; a worker admits through admission.admitter(slot)
    events_fd: int
    master_pid: int
    heartbeat_interval: float
    # Its place in its generation (supervisor/ranks.py), for the datagram listeners.
    rank: int = 0
    generation_size: int = 1
    # The target table (shared/targets_table.py, which gives the contract) and, by
    # listener (parallel to `listeners`), the rows of its targets and its round-robin word.
    targets: TargetTable | None = None
    listener_targets: tuple[ListenerTargets, ...] = ()


def reads_datagram_listener(index: int, rank: int, generation_size: int) -> bool:
    """Whether the worker of `rank` reads datagram listener `index` (counted among the
    datagram listeners): one worker of a generation reads each (supervisor/ranks.py)."""
    return index % generation_size == rank
