"""forkproxy.relay.access_log_format: exact lines, and lines that a logfmt or JSON reader
turns back into the record's values whatever the names hold."""

from __future__ import annotations

import dataclasses
import datetime
import json
import re

import pytest
from hypothesis import example, given, settings

from forkproxy.relay.access_log_format import (
    END_REASONS,
    AccessRecord,
    format_json,
    format_logfmt,
    line_formatter,
)
from tests.unit.relay.access_log_cases import CONTROL, INT64, JSON, LOGFMT, ODD, WEB, records


@pytest.mark.parametrize(("record", "line"), LOGFMT)
def test_logfmt_lines(record: AccessRecord, line: str) -> None:
    assert format_logfmt(record) == line.encode()


@pytest.mark.parametrize(("record", "line"), JSON)
def test_json_lines(record: AccessRecord, line: str) -> None:
    assert format_json(record) == line.encode()


def test_the_formatter_by_name() -> None:
    assert line_formatter("logfmt") is format_logfmt
    assert line_formatter("json") is format_json
    with pytest.raises(ValueError, match="unknown access log format 'xml'"):
        line_formatter("xml")


def test_end_reasons() -> None:
    assert END_REASONS == (
        "client-closed", "target-closed", "client-reset", "target-reset", "idle-timeout",
        "connect-timeout", "connect-failed", "refused-cap", "refused-per-source", "no-target",
        "proxy-header-error", "stopped",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("end_ns", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (951_782_400_000_000_000, "2000-02-29T00:00:00.000Z"),
        (4_107_542_399_999_999_999, "2100-02-28T23:59:59.999Z"),
        (2**63 - 1, "2262-04-11T23:47:16.854Z"),
        (-(2**63), "1677-09-21T00:12:43.145Z"),
    ],
)
def test_time(end_ns: int, text: str) -> None:
    line = format_logfmt(dataclasses.replace(WEB, end_ns=end_ns)).decode()
    assert line.startswith(f"time={text} ")


@given(INT64)
def test_time_is_what_datetime_says(end_ns: int) -> None:
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    moment = epoch + datetime.timedelta(microseconds=end_ns // 1000)
    expected = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    line = format_json(dataclasses.replace(WEB, end_ns=end_ns))
    assert json.loads(line)["time"] == expected


@pytest.mark.parametrize(
    ("ns", "text"),
    [(0, "0.000"), (999, "0.000"), (1000, "0.001"), (1_999_999, "1.999"), (-5, "0.000"),
     (2**63 - 1, "9223372036854.775")],
)  # fmt: skip
def test_milliseconds_are_truncated_to_the_microsecond(ns: int, text: str) -> None:
    line = format_logfmt(dataclasses.replace(WEB, duration_ns=ns, connect_ns=ns)).decode()
    assert f" duration_ms={text} " in line
    assert f" connect_ms={text if ns >= 0 else ''} " in line


# --- a logfmt reader, to check that lines read back -------------------------------------

_PAIR = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^ ]*)(?: |\n$)')
_ESCAPE = re.compile(r"\\(u[0-9a-f]{4}|.)")
_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def read_logfmt(line: str) -> dict[str, str]:
    pairs = {}
    position = 0
    for match in _PAIR.finditer(line):
        assert match.start() == position, line
        position = match.end()
        value = match.group(2)
        if value.startswith('"'):
            value = _ESCAPE.sub(
                lambda m: _UNESCAPE.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), value[1:-1]
            )
        pairs[match.group(1)] = value
    assert position == len(line), line
    return pairs


@settings(max_examples=500)
@given(records)
@example(CONTROL)
@example(ODD)
def test_lines_read_back(record: AccessRecord) -> None:
    logfmt = format_logfmt(record).decode("utf-8")
    as_json = format_json(record).decode("utf-8")
    assert logfmt.count("\n") == as_json.count("\n") == 1
    assert logfmt.endswith("\n") and as_json.endswith("\n")
    read_back = read_logfmt(logfmt)
    parsed = json.loads(as_json)
    assert list(read_back) == list(parsed)  # the same keys in the same order
    for key in ("listener", "client", "target", "end"):
        assert read_back[key] == parsed[key] == getattr(record, key)
    for key in ("worker", "bytes_from_client", "bytes_to_client"):
        assert int(read_back[key]) == parsed[key] == getattr(record, key)
    if record.connect_ns < 0:
        assert read_back["connect_ms"] == "" and parsed["connect_ms"] is None
