"""The compiled PROXY header parser gives proxy_header.parse's result for every input:
random bytes, valid headers of every kind, their prefixes, and valid headers broken by one
byte."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from forkproxy.relay.proxy_header import (
    REASONS,
    V2_MAX_LENGTH,
    HeaderError,
    NeedMore,
    ProxyHeader,
    parse,
)
from tests.unit.relay.engine_proxy import engine_module
from tests.unit.relay.proxy_header_cases import BAD, GOOD, NEED_MORE, SIGNATURE, valid_headers

pytestmark = pytest.mark.skipif(engine_module is None, reason="the compiled engine is not built")


def python_result(data: bytes) -> tuple[Any, ...]:
    """parse(data) in the shape _engine.parse_proxy_header returns."""
    result = parse(data)
    if isinstance(result, NeedMore):
        return ("need-more", result.at_least)
    if isinstance(result, HeaderError):
        return ("error", result.reason)
    assert isinstance(result, ProxyHeader)
    return (
        "header",
        result.version,
        result.command,
        result.family,
        result.source,
        result.destination,
        result.length,
    )


def c_result(data: bytes) -> tuple[Any, ...]:
    assert engine_module is not None
    result: tuple[Any, ...] = engine_module.parse_proxy_header(data)
    return result


def test_the_tables_agree() -> None:
    assert engine_module is not None
    assert engine_module.PROXY_HEADER_REASONS == REASONS
    assert engine_module.PROXY_HEADER_V2_MAX_LENGTH == V2_MAX_LENGTH


@pytest.mark.parametrize("data", [p.values[0] for p in GOOD + NEED_MORE + BAD])
def test_every_table_case_and_its_prefixes(data: bytes) -> None:
    for size in range(len(data) + 1):
        assert c_result(data[:size]) == python_result(data[:size]), size


@settings(max_examples=3000)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=120).map(lambda b: b"PROXY " + b),
        st.binary(max_size=60).map(lambda b: SIGNATURE + b),
        # v1 lines from their own alphabet, so that the address parsers get real work
        st.text("0123456789abcdefABCDEF:. ", max_size=100).map(
            lambda t: b"PROXY TCP6 " + t.encode() + b"\r\n"
        ),
        st.text("0123456789. ", max_size=60).map(lambda t: b"PROXY TCP4 " + t.encode() + b"\r\n"),
    )
)
@example(b"PROXY TCP6 ::: ::1 1 2\r\n")
@example(b"PROXY TCP6 1:2:3:4:5:6:7:1.2.3.4 ::1 1 2\r\n")
def test_random_bytes(data: bytes) -> None:
    assert c_result(data) == python_result(data)


@settings(max_examples=1000)
@given(valid_headers, st.binary(max_size=20))
def test_valid_headers_and_their_prefixes(case: tuple[bytes, ProxyHeader], after: bytes) -> None:
    stream = case[0] + after
    for size in range(len(stream) + 1):
        assert c_result(stream[:size]) == python_result(stream[:size]), size


@settings(max_examples=1000)
@given(valid_headers, st.data())
def test_valid_headers_broken_by_one_byte(case: tuple[bytes, ProxyHeader], data: Any) -> None:
    mutated = bytearray(case[0])
    position = data.draw(st.integers(0, len(mutated) - 1))
    if data.draw(st.booleans()):
        mutated[position] = data.draw(st.integers(0, 255))
    else:
        del mutated[position]
    stream = bytes(mutated)
    for size in range(len(stream) + 1):
        assert c_result(stream[:size]) == python_result(stream[:size]), size
