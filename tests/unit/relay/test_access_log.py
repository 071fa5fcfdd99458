"""The worker's access log: files opened and reopened, lines written whole or dropped and
counted, and why a relay ended as the log says it."""

import errno
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from forkproxy.errors import ForkproxyError
from forkproxy.relay.access_log import (
    AccessLogFiles,
    access_log_problems,
    check_access_logs,
    connect_end,
    relay_end,
)
from forkproxy.relay.target_connect import NoAddress
from forkproxy.relay.timeouts import GRACEFUL_ERROR, IDLE_ERROR
from forkproxy.settings.arguments import parse_args
from forkproxy.shared.layout import ACCESS_LOG_DROPPED, SLOT_WORDS


def _slot() -> memoryview:
    return memoryview(bytearray(SLOT_WORDS * 8)).cast("q")


def test_lines_are_appended_whole_and_a_reopen_follows_a_rename(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    files = AccessLogFiles(_slot())
    log = files.listener_log(str(path), "json", "web", 3)
    client = socket.AF_INET, ("192.0.2.7", 5)
    log.refused(*client, "refused-cap")
    os.rename(path, tmp_path / "access.log.1")
    log.refused(*client, "refused-per-source")  # still the renamed file
    files.reopen()
    log.refused(*client, "stopped")
    files.close()
    old = [json.loads(line) for line in (tmp_path / "access.log.1").read_text().splitlines()]
    new = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["end"] for line in old] == ["refused-cap", "refused-per-source"]
    assert [(line["end"], line["client"], line["worker"]) for line in new] == [
        ("stopped", "192.0.2.7:5", 3)
    ]


def test_one_file_per_path_however_many_listeners(tmp_path: Path) -> None:
    files = AccessLogFiles(_slot())
    first = files.listener_log(str(tmp_path / "a"), "logfmt", "one", 0)
    second = files.listener_log(str(tmp_path / "a"), "json", "two", 0)
    assert first.sink is second.sink and len(files.sinks) == 1
    files.close()


def test_a_line_the_file_cannot_take_is_dropped_and_counted() -> None:
    slot = _slot()
    files = AccessLogFiles(slot)
    log = files.listener_log("/dev/full", "logfmt", "web", 0)
    log.refused(socket.AF_INET, ("192.0.2.7", 5), "refused-cap")
    log.refused(socket.AF_INET, ("192.0.2.7", 6), "refused-cap")
    assert slot[ACCESS_LOG_DROPPED] == 2
    files.close()


def test_a_failed_reopen_keeps_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    files = AccessLogFiles(_slot())
    log = files.listener_log(str(directory / "access.log"), "logfmt", "web", 0)
    directory.rename(tmp_path / "moved")
    files.reopen()  # logs an error
    log.refused(socket.AF_INET, ("192.0.2.7", 5), "refused-cap")
    files.close()
    assert "end=refused-cap" in (tmp_path / "moved" / "access.log").read_text()


def test_check_access_logs_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "access.log"
    config = parse_args([f"--access-log={path}", "127.0.0.1:9"])
    with pytest.raises(ForkproxyError) as raised:
        check_access_logs(config)
    assert str(raised.value) == f"cannot open access log '{path}': No such file or directory"
    check_access_logs(parse_args(["--access-log=-", "127.0.0.1:9"]))  # nothing to open


def _relay(error: OSError | None, ended_by: int) -> object:
    return SimpleNamespace(
        error=error,
        ended_by=ended_by,
        client_to_target=SimpleNamespace(src_fd=10),
        target_to_client=SimpleNamespace(src_fd=11),
    )


@pytest.mark.parametrize(
    ("relay", "end"),
    [
        (_relay(None, 10), "client-closed"),
        (_relay(None, 11), "target-closed"),
        (_relay(IDLE_ERROR, -1), "idle-timeout"),
        (_relay(GRACEFUL_ERROR, -1), "stopped"),
        (_relay(OSError(errno.ECONNRESET, "reset"), 10), "client-reset"),
        (_relay(OSError(errno.EPIPE, "pipe"), 11), "target-reset"),
        (_relay(OSError(errno.ENOMEM, "no pipe"), -1), "target-reset"),
    ],
)
def test_why_a_relay_ended(relay: object, end: str) -> None:
    assert relay_end(relay) == end  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "end"),
    [
        (NoAddress(errno.EHOSTUNREACH, "cannot resolve 'x.invalid'"), "no-target"),
        (OSError(errno.ETIMEDOUT, "timed out"), "connect-timeout"),
        (OSError(errno.ECONNREFUSED, "refused"), "connect-failed"),
    ],
)
def test_why_a_connect_failed(error: OSError, end: str) -> None:
    assert connect_end(error) == end


def test_check_finds_what_the_start_would_without_writing(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "access.log"
    fresh = tmp_path / "fresh.log"
    config = parse_args(
        ["--access-log=-", "--config", str(_config_file(tmp_path, missing, fresh)), "127.0.0.1:9"]
    )
    assert access_log_problems(config) == [  # by path
        f"cannot open access log '{tmp_path}': Is a directory",
        f"cannot open access log '{missing}': No such file or directory",
    ]
    assert not fresh.exists()


def _config_file(tmp_path: Path, missing: Path, fresh: Path) -> Path:
    path = tmp_path / "forkproxy.toml"
    path.write_text(
        f'[listeners.a]\naccess-log = "{missing}"\n'
        f'[listeners.b]\naccess-log = "{tmp_path}"\n'
        f'[listeners.c]\naccess-log = "{fresh}"\n'
    )
    return path
