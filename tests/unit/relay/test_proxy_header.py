"""forkproxy.relay.proxy_header: exact results for good and bad headers, headers split
anywhere (a byte at a time too), data after the header kept, and a fuzz test that the
parser answers every input with one of its documented results."""

from __future__ import annotations

import socket

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from forkproxy.relay.proxy_header import (
    PARSE_REASONS,
    REASONS,
    HeaderError,
    NeedMore,
    ParseResult,
    ProxyHeader,
    parse,
)
from forkproxy.relay.proxy_protocol import encode_v1, encode_v2
from tests.unit.relay.proxy_header_cases import (
    AF_INET,
    AF_INET6,
    AF_UNIX,
    AF_UNSPEC,
    BAD,
    GOOD,
    NEED_MORE,
    SIGNATURE,
    V4_LINE,
    header,
    valid_headers,
)


@pytest.mark.parametrize(("data", "expected"), GOOD)
def test_good_headers(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == expected


@pytest.mark.parametrize(("data", "at_least"), NEED_MORE)
def test_incomplete_headers(data: bytes, at_least: int) -> None:
    assert parse(data) == NeedMore(at_least)


@pytest.mark.parametrize(("data", "reason"), BAD)
def test_bad_headers(data: bytes, reason: str) -> None:
    assert parse(data) == HeaderError(reason)
    assert reason in PARSE_REASONS


def test_every_reason_is_produced_by_a_case() -> None:
    produced = {param.values[1] for param in BAD}
    assert produced == set(PARSE_REASONS)
    assert set(REASONS) - set(PARSE_REASONS) == {"truncated", "timeout"}


def test_the_first_byte_tells_the_version() -> None:
    assert parse(b"X") == HeaderError("bad-signature")
    assert parse(b"P") == NeedMore(15)
    assert parse(b"\r") == NeedMore(16)
    assert parse(bytearray(V4_LINE)) == parse(V4_LINE)


@pytest.mark.parametrize("data", [param.values[0] for param in GOOD])
def test_a_byte_at_a_time(data: bytes) -> None:
    whole = parse(data)
    assert isinstance(whole, ProxyHeader)
    for size in range(whole.length):
        partial = parse(data[:size])
        assert isinstance(partial, NeedMore), (size, partial)
        assert size < partial.at_least <= whole.length
    for size in range(whole.length, len(data) + 1):
        assert parse(data[:size]) == whole


# --- properties ------------------------------------------------------------------------


def _check_result(data: bytes, result: ParseResult) -> None:
    """What every answer promises, whatever the input."""
    if isinstance(result, NeedMore):
        assert result.at_least > len(data)
    elif isinstance(result, HeaderError):
        assert result.reason in PARSE_REASONS
    else:
        assert isinstance(result, ProxyHeader)
        assert 0 < result.length <= len(data)
        assert (result.source is None) == (result.destination is None)


@settings(max_examples=2000)
@given(st.binary(max_size=300))
@example(b"PROXY TCP6 " + b":" * 100)
@example(SIGNATURE + b"\x21\x11\xff\xff")
def test_any_bytes_get_a_documented_result(data: bytes) -> None:
    _check_result(data, parse(data))


@settings(max_examples=500)
@given(valid_headers, st.binary(max_size=20), st.data())
def test_valid_headers_with_random_splits(
    case: tuple[bytes, ProxyHeader], after: bytes, data: st.DataObject
) -> None:
    encoded, expected = case
    assert parse(encoded + after) == expected
    # A receiver appends what each read brings and parses the whole buffer again.
    stream = encoded + after
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    received = b""
    for cut in [*cuts, len(stream)]:
        received = stream[:cut]
        result = parse(received)
        if len(received) < expected.length:
            assert isinstance(result, NeedMore)
            assert len(received) < result.at_least <= expected.length
        else:
            assert result == expected
    assert stream[expected.length :] == after  # the client's data, not lost


@settings(max_examples=500)
@given(valid_headers, st.data())
def test_broken_headers_fail_the_same_as_bytes_arrive(
    case: tuple[bytes, ProxyHeader], data: st.DataObject
) -> None:
    encoded, _ = case
    position = data.draw(st.integers(0, len(encoded) - 1))
    mutated = bytearray(encoded)
    mutation = data.draw(st.sampled_from(["replace", "insert", "delete"]))
    if mutation == "replace":
        mutated[position] = data.draw(st.integers(0, 255))
    elif mutation == "insert":
        mutated.insert(position, data.draw(st.integers(0, 255)))
    else:
        del mutated[position]
    stream = bytes(mutated) + data.draw(st.binary(max_size=20))
    # Once an answer is final (a header or an error), more bytes never change it.
    final: ParseResult | None = None
    for size in range(len(stream) + 1):
        result = parse(stream[:size])
        _check_result(stream[:size], result)
        if final is not None:
            assert result == final, size
        elif not isinstance(result, NeedMore):
            final = result


_hosts = {
    AF_INET: st.binary(min_size=4, max_size=4).map(lambda b: socket.inet_ntop(AF_INET, b)),
    AF_INET6: st.binary(min_size=16, max_size=16).map(lambda b: socket.inet_ntop(AF_INET6, b)),
}


@given(st.sampled_from([1, 2]), st.sampled_from([AF_INET, AF_INET6]), st.data())
def test_what_forkproxy_sends_it_reads_back(version: int, family: int, data: st.DataObject) -> None:
    client = (data.draw(_hosts[family]), data.draw(st.integers(0, 65535)))
    local = (data.draw(_hosts[family]), data.draw(st.integers(0, 65535)))
    encoded = (encode_v1 if version == 1 else encode_v2)(client, local, family)
    result = parse(encoded)
    assert isinstance(result, ProxyHeader)
    assert result.length == len(encoded)
    mapped = [h.startswith("::ffff:") and "." in h for h in (client[0], local[0])]
    if family == AF_INET6 and all(mapped):  # both ends IPv4-mapped go out as TCP4
        assert result.source == (client[0].removeprefix("::ffff:"), client[1])
    else:
        assert (result.family, result.source, result.destination) == (family, client, local)


def test_unix_clients_are_sent_as_unknown_and_local() -> None:
    assert parse(encode_v1("", "", AF_UNIX)) == header(1, AF_UNSPEC, None, None, 15)
    assert parse(encode_v2("", "", AF_UNIX)) == header(2, AF_UNSPEC, None, None, 16, "LOCAL")
