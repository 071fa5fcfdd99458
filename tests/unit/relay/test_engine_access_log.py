"""The compiled access-log formatter writes access_log_format's bytes for every record:
random records with unicode names, odd addresses, any int64, and lines longer than the
engine's buffer."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import example, given, settings

from forkproxy.relay.access_log_format import END_REASONS, AccessRecord, line_formatter
from tests.unit.relay.access_log_cases import CONTROL, JSON, LOGFMT, ODD, WEB, records
from tests.unit.relay.engine_proxy import engine_module

pytestmark = pytest.mark.skipif(engine_module is None, reason="the compiled engine is not built")

FORMATS = ("logfmt", "json")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
LONGEST_FIXED = AccessRecord(
    INT64_MIN,
    "",
    "",
    "",
    INT64_MIN,
    INT64_MAX,
    INT64_MAX,
    INT64_MIN,
    INT64_MIN,
    "proxy-header-error",
)


def c_line(format_name: str, record: AccessRecord) -> bytes:
    assert engine_module is not None
    line: bytes = engine_module.format_access_log(format_name, *dataclasses.astuple(record))
    return line


def test_the_end_reasons_agree() -> None:
    assert engine_module is not None
    assert engine_module.END_REASONS == END_REASONS


@pytest.mark.parametrize("format_name", FORMATS)
@pytest.mark.parametrize("record", [case[0] for case in LOGFMT + JSON])
def test_the_table_cases(format_name: str, record: AccessRecord) -> None:
    assert c_line(format_name, record) == line_formatter(format_name)(record)


@pytest.mark.parametrize("format_name", FORMATS)
def test_a_line_longer_than_the_buffer(format_name: str) -> None:
    record = dataclasses.replace(WEB, listener="\x01" * 400, target="é" * 300)
    line = c_line(format_name, record)
    assert len(line) > 512 * 4
    assert line == line_formatter(format_name)(record)


def test_invalid_utf8_is_replaced() -> None:
    # Python text never holds it, C input could: each bad byte is written as \ufffd, quoted.
    assert engine_module is not None
    line = engine_module.format_access_log(
        "logfmt", 0, b"a\xffb\xe2\x82", "", "", 0, 0, 0, 0, 0, "stopped"
    )
    assert b' listener="a\\ufffdb\\ufffd\\ufffd" ' in line


def test_unknown_end_reason_or_format() -> None:
    assert engine_module is not None
    with pytest.raises(ValueError, match="end reason"):
        engine_module.format_access_log("logfmt", 0, "", "", "", 0, 0, 0, 0, 0, "bored")
    with pytest.raises(ValueError, match="format"):
        engine_module.format_access_log("xml", 0, "", "", "", 0, 0, 0, 0, 0, "stopped")


@settings(max_examples=1500)
@given(records)
@example(CONTROL)
@example(ODD)
@example(LONGEST_FIXED)
def test_random_records(record: AccessRecord) -> None:
    assert engine_module is not None
    texts = (record.listener, record.client, record.target)
    text_bytes = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    for format_name in FORMATS:
        line = c_line(format_name, record)
        assert line == line_formatter(format_name)(record)
        assert len(line) <= engine_module.ACCESS_LOG_FIXED + 6 * text_bytes  # csrc/formats.h
