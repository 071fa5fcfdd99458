"""What a master hands the image it re-executes into on a reload, and how.

JSON in a memfd whose descriptor number is in $FORKPROXY_REEXEC_STATE: the listening and
metrics sockets (descriptor, name, label, the socket file to unlink, and for those bound
from --listen or --metrics the address asked for, so a new configuration keeps what it
still names), the shared mapping's memfd, both ends of the workers' event pipe, the live
workers (pid, slot, generation, start, ready, draining), the generation numbers and the
current generation's ranks (which worker reads which datagram listener), how many
listener rows of the scoreboard workers may have written, the counters kept outside the
mapping (restarts, reloads) and the settings the previous image ran with (its argv and
--config text), which the new one falls back to. Every descriptor named stays open
across exec(2): the reloader makes them inheritable just before it (reload.py), the new
image makes them close-on-exec again at once. Times are CLOCK_MONOTONIC seconds, the
same clock on both sides of an exec. Never execs, forks or reads settings.
"""

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from forkproxy.settings.address import ListenAddress

STATE_VARIABLE = "FORKPROXY_REEXEC_STATE"
# Set for a reload's --check: it then also prints check_marker(), for the old image.
CHECK_VARIABLE = "FORKPROXY_RELOAD_CHECK"
_CHECK_PREFIX = "forkproxy-reload:"
STATE_FORMAT = 1  # what this code writes and reads; a reload's check says what it reads
_MAGIC = "forkproxy re-exec state"
_MEMFD_NAME = "forkproxy-reexec-state"
_MAX_BYTES = 64 << 20


class StateError(Exception):
    """$FORKPROXY_REEXEC_STATE names nothing this process can take over."""


@dataclass(frozen=True, slots=True)
class SocketRecord:
    """A listening socket (proxied or metrics) the new image keeps on the same fd."""

    fd: int
    name: str
    label: str
    unlink_path: str | None
    unlink_inode: int
    address: str | None  # address_key() of the address it was bound for; None: passed


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A live worker as the previous image knew it (`worker_record.WorkerProcess`)."""

    pid: int
    slot: int
    generation: int
    started: float
    ready: bool
    stopping: bool
    killed: bool
    hung: bool
    kill_deadline: float | None  # None: no deadline (JSON has no infinity)


@dataclass(frozen=True, slots=True)
class ReexecState:
    pid: int
    version: str  # of the forkproxy that wrote it
    argv: tuple[str, ...]
    config_text: str | None  # the --config file's text the previous image ran with
    log_level: str
    listeners: tuple[SocketRecord, ...]
    metrics_listeners: tuple[SocketRecord, ...]
    mapping_fd: int
    events: tuple[int, int]  # the event pipe: read end, write end
    workers: tuple[WorkerRecord, ...]
    generation: int
    generation_serving: bool
    target_workers: int
    ranks_size: int  # the current generation's ranks.Ranks: its size, and rank by slot
    ranks: tuple[tuple[int, int], ...]
    listener_rows: int  # Scoreboard.listener_rows
    restarts: int
    reloads_ok: int
    reloads_failed: int
    last_reload_success: float | None  # wall-clock time.time(), for the metric
    reload_pending: bool  # asked for again during this reload: one more once it serves
    reload_started: float  # when this reload was asked for

    def descriptors(self) -> list[int]:
        """Every descriptor that must stay open across the exec."""
        sockets = [record.fd for record in (*self.listeners, *self.metrics_listeners)]
        return [*sockets, self.mapping_fd, *self.events]


def check_marker(version: str, layout: int, engine: str) -> str:
    """The line a reload's check prints about the code it ran: what state format it
    reads, which shared memory layout it uses, its version and engine."""
    return f"{_CHECK_PREFIX} state={STATE_FORMAT} layout={layout} version={version} engine={engine}"


def parse_check_marker(lines: list[str]) -> dict[str, str] | None:
    """The fields of the check_marker line among `lines`, or None if there is none."""
    for line in lines:
        if line.startswith(_CHECK_PREFIX):
            fields = line[len(_CHECK_PREFIX) :].split()
            return dict(field.partition("=")[::2] for field in fields)
    return None


def address_key(address: ListenAddress) -> str:
    """What identifies an address forkproxy binds, across reloads: its family, socket
    type, socket address as asked for, and whether it is dual-stack (not its name)."""
    sockaddr: Any = address.sockaddr
    if isinstance(sockaddr, str) and sockaddr.startswith("/"):
        sockaddr = os.path.normpath(sockaddr)
    elif isinstance(sockaddr, tuple):
        sockaddr = list(sockaddr)
    return json.dumps([int(address.family), int(address.kind), sockaddr, address.dual_stack])


def write_state(state: ReexecState) -> int:
    """A memfd (close-on-exec) holding `state`, positioned at its start. Raises OSError."""
    data = asdict(state)
    data["magic"] = _MAGIC
    data["format"] = STATE_FORMAT
    data["workers"] = [
        {**worker, "kill_deadline": _finite(worker["kill_deadline"])} for worker in data["workers"]
    ]
    payload = json.dumps(data, allow_nan=False).encode()
    fd = os.memfd_create(_MEMFD_NAME, os.MFD_CLOEXEC)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def take_state(environ: dict[str, str] | os._Environ[str] = os.environ) -> ReexecState | None:
    """The state $FORKPROXY_REEXEC_STATE names (None if unset), its memfd closed and the
    variable removed. StateError if it is not a state this process was handed."""
    text = environ.pop(STATE_VARIABLE, None)
    if text is None:
        return None
    if not text.isdigit():
        raise StateError(f"${STATE_VARIABLE} is not a descriptor number: {text[:20]!r}")
    fd = int(text)
    try:
        what = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        what = ""
    if not what.startswith(f"/memfd:{_MEMFD_NAME} "):
        # Not ours to read or close: a variable left in an environment, say.
        raise StateError(f"fd {fd} is not a forkproxy state memfd")
    try:
        payload = _read_all(fd)
    except OSError as error:
        raise StateError(f"cannot read fd {fd}: {error.strerror}") from None
    finally:
        _close(fd)
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise StateError(f"fd {fd} does not hold a forkproxy state") from None
    if not isinstance(data, dict) or data.get("magic") != _MAGIC:
        raise StateError(f"fd {fd} does not hold a forkproxy state")
    if data.get("format") != STATE_FORMAT:
        raise StateError(f"the state has format {data.get('format')}, this is {STATE_FORMAT}")
    if data.get("pid") != os.getpid():
        raise StateError(f"the state is process {data.get('pid')}'s, this is {os.getpid()}")
    try:
        return _decode(data)
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"the state is incomplete: {error!r}") from None


def _decode(data: dict[str, Any]) -> ReexecState:
    values = {field.name: data[field.name] for field in fields(ReexecState)}
    values["argv"] = tuple(str(arg) for arg in values["argv"])
    values["listeners"] = tuple(_record(SocketRecord, item) for item in values["listeners"])
    values["metrics_listeners"] = tuple(
        _record(SocketRecord, item) for item in values["metrics_listeners"]
    )
    values["workers"] = tuple(_record(WorkerRecord, item) for item in values["workers"])
    values["ranks"] = tuple((int(slot), int(rank)) for slot, rank in values["ranks"])
    read_end, write_end = values["events"]
    values["events"] = (int(read_end), int(write_end))
    return ReexecState(**values)


def _record(cls: type[Any], item: dict[str, Any]) -> Any:
    return cls(**{field.name: item[field.name] for field in fields(cls)})


def _finite(value: float | None) -> float | None:
    return None if value is None or value == float("inf") else value


def _read_all(fd: int) -> bytes:
    chunks = []
    size = 0
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_BYTES:
            raise OSError(0, "too large for a state")
    return b"".join(chunks)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
