"""The state a reload hands the new image: written, read back, refused when not ours, and
the check's line about the installed code."""

import os
import socket

import pytest

from forkproxy.settings.address import parse_listen
from forkproxy.supervisor.reexec_state import (
    STATE_VARIABLE,
    ReexecState,
    SocketRecord,
    StateError,
    WorkerRecord,
    address_key,
    check_marker,
    parse_check_marker,
    take_state,
    write_state,
)


def _state(**changes: object) -> ReexecState:
    values: dict[str, object] = {
        "pid": os.getpid(),
        "version": "1.2.3",
        "argv": ("--config", "/etc/forkproxy.toml", "-w", "2"),
        "config_text": 'targets = ["127.0.0.1:80"]\n# ünïcode\n',
        "log_level": "debug",
        "listeners": (
            SocketRecord(3, "web", "fd 3 'web' (0.0.0.0:80)", None, 0, None),
            SocketRecord(4, "", "/run/a.sock", "/run/a.sock", 77, '[1, 1, "/run/a.sock", false]'),
        ),
        "metrics_listeners": (SocketRecord(5, "metrics", "127.0.0.1:9100", None, 0, None),),
        "mapping_fd": 6,
        "events": (7, 8),
        "workers": (
            WorkerRecord(101, 0, 4, 12.5, True, False, False, False, None),
            WorkerRecord(102, 1, 3, 2.5, True, True, False, False, 99.0),
        ),
        "generation": 4,
        "generation_serving": True,
        "target_workers": 2,
        "ranks_size": 2,
        "ranks": ((0, 1), (3, 0)),
        "listener_rows": 2,
        "restarts": 7,
        "reloads_ok": 3,
        "reloads_failed": 1,
        "last_reload_success": 1_700_000_000.25,
        "reload_pending": True,
        "reload_started": 1234.5,
    }
    values.update(changes)
    return ReexecState(**values)  # type: ignore[arg-type]


def test_what_is_written_is_read_back() -> None:
    state = _state()
    fd = write_state(state)
    environ = {STATE_VARIABLE: str(fd), "OTHER": "x"}
    assert take_state(environ) == state
    assert environ == {"OTHER": "x"}  # the variable is gone ...
    with pytest.raises(OSError):
        os.fstat(fd)  # ... and so is the memfd


def test_no_deadline_is_none_in_json() -> None:
    worker = WorkerRecord(101, 0, 0, 1.0, False, False, False, False, float("inf"))
    fd = write_state(_state(workers=(worker,)))
    taken = take_state({STATE_VARIABLE: str(fd)})
    assert taken is not None and taken.workers[0].kill_deadline is None


def test_unset_is_no_state() -> None:
    assert take_state({}) is None


def test_a_descriptor_that_is_not_a_state_is_left_alone() -> None:
    """A stray variable naming a passed socket, say: neither read nor closed."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with pytest.raises(StateError, match="is not a forkproxy state memfd"):
            take_state({STATE_VARIABLE: str(listener.fileno())})
        assert listener.getsockname()  # still open
    with pytest.raises(StateError, match="not a descriptor number"):
        take_state({STATE_VARIABLE: "x"})


def test_the_state_of_another_process_is_refused() -> None:
    fd = write_state(_state(pid=os.getpid() + 1))
    with pytest.raises(StateError, match="the state is process"):
        take_state({STATE_VARIABLE: str(fd)})


def test_a_memfd_of_that_name_with_other_content_is_refused() -> None:
    fd = os.memfd_create("forkproxy-reexec-state", os.MFD_CLOEXEC)
    os.write(fd, b'{"magic": "something else"}')
    os.lseek(fd, 0, os.SEEK_SET)
    with pytest.raises(StateError, match="does not hold a forkproxy state"):
        take_state({STATE_VARIABLE: str(fd)})


def test_descriptors_are_every_one_to_keep() -> None:
    assert sorted(_state().descriptors()) == [3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("8080", "web=8080", True),  # the name is not the address
        ("/run//a.sock", "/run/a.sock", True),
        ("[::1]:80", "[::1]:80", True),
        ("8080", "0.0.0.0:8080", False),  # dual-stack or not
        ("127.0.0.1:8080", "127.0.0.1:8081", False),
        ("@name", "/name", False),
        ("udp:127.0.0.1:8080", "127.0.0.1:8080", False),  # one port, two socket types
        ("unix-dgram:/run/a.sock", "/run/a.sock", False),
        ("seqpacket:/run/a.sock", "/run/a.sock", False),
    ],
)
def test_address_keys(one: str, other: str, same: bool) -> None:
    assert (address_key(parse_listen(one)) == address_key(parse_listen(other))) is same


def test_the_check_marker() -> None:
    line = check_marker("1.2.3", 2, "python")
    assert parse_check_marker(["route line", line]) == {
        "state": "1",
        "layout": "2",
        "version": "1.2.3",
        "engine": "python",
    }
    assert parse_check_marker(["'web' 127.0.0.1:80 -> 127.0.0.1:8080"]) is None
