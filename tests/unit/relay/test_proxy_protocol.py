"""forkproxy.relay.proxy_protocol: exact bytes, every v2 field, and round trips through the
independent decoder in tests/support (which is itself checked against malformed input)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from forkproxy.relay.proxy_protocol import V2_SIGNATURE, encode_v1, encode_v2, header_encoder
from tests.support.proxy_protocol_decoder import (
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderIncomplete,
    decode,
    read_header,
)

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
AF_UNIX = socket.AF_UNIX
AF_VSOCK = getattr(socket, "AF_VSOCK", 40)

# proxy-protocol.txt 2.2, typed out again rather than taken from the module under test
SIGNATURE = bytes.fromhex("0D0A0D0A000D0A515549540A")
ALL_F = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

Encoder = Callable[[Any, Any, int], bytes]


# --- exact bytes ---------------------------------------------------------------------

V1_CASES = [
    pytest.param(
        AF_INET,
        ("192.168.0.1", 56324),
        ("192.168.0.11", 443),
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        id="spec-2.1-example",
    ),
    pytest.param(
        AF_INET,
        ("255.255.255.255", 65535),
        ("255.255.255.255", 65535),
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        id="tcp4-longest-56",
    ),
    pytest.param(
        AF_INET,
        ("0.0.0.0", 0),
        ("0.0.0.0", 0),
        b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
        id="tcp4-zeros",
    ),
    pytest.param(
        AF_INET6,
        (ALL_F, 65535, 0, 0),
        (ALL_F, 65535, 0, 0),
        f"PROXY TCP6 {ALL_F} {ALL_F} 65535 65535\r\n".encode(),
        id="tcp6-longest-104",
    ),
    pytest.param(
        AF_INET6,
        ("::1", 40000, 0, 0),
        ("::1", 8080, 0, 0),
        b"PROXY TCP6 ::1 ::1 40000 8080\r\n",
        id="tcp6-loopback",
    ),
    pytest.param(
        AF_INET6,
        ("2001:db8::7", 51334, 7, 0),
        ("2001:db8::9", 443, 0, 0),
        b"PROXY TCP6 2001:db8::7 2001:db8::9 51334 443\r\n",
        id="tcp6-flowinfo-ignored",
    ),
    pytest.param(
        AF_INET6,
        ("2001:0DB8:0:0:0:0:0:1", 1, 0, 0),
        ("2001:db8:0:0:1:0:0:1", 2, 0, 0),
        b"PROXY TCP6 2001:db8::1 2001:db8::1:0:0:1 1 2\r\n",
        id="tcp6-canonical-rfc5952",
    ),
    pytest.param(
        AF_INET6,
        ("fe80::1%lo", 5, 0, 1),
        ("fe80::2%1", 6, 0, 1),
        b"PROXY TCP6 fe80::1 fe80::2 5 6\r\n",
        id="tcp6-scope-dropped",
    ),
    pytest.param(
        AF_INET6,
        ("::ffff:192.0.2.7", 51334, 0, 0),
        ("::ffff:127.0.0.1", 8080, 0, 0),
        b"PROXY TCP4 192.0.2.7 127.0.0.1 51334 8080\r\n",
        id="mapped-sent-as-tcp4",
    ),
    pytest.param(
        AF_INET6,
        ("::ffff:192.0.2.7", 51334, 0, 0),
        ("2001:db8::9", 443, 0, 0),
        b"PROXY TCP6 ::ffff:c000:207 2001:db8::9 51334 443\r\n",
        id="one-end-mapped-stays-tcp6-in-hex",
    ),
    pytest.param(
        AF_INET6,
        ("::192.0.2.7", 1, 0, 0),
        ("::0.1.0.0", 2, 0, 0),
        b"PROXY TCP6 ::c000:207 ::1:0 1 2\r\n",
        id="compat-no-dotted-tail",
    ),
    pytest.param(AF_UNIX, "", "/run/app.sock", b"PROXY UNKNOWN\r\n", id="unix-unnamed"),
    pytest.param(AF_UNIX, b"\0peer", b"\0app", b"PROXY UNKNOWN\r\n", id="unix-abstract"),
    pytest.param(AF_VSOCK, (3, 1234), (2, 80), b"PROXY UNKNOWN\r\n", id="vsock-2-tuple"),
]


@pytest.mark.parametrize(("family", "client", "local", "expected"), V1_CASES)
def test_v1_exact_bytes(family: int, client: Any, local: Any, expected: bytes) -> None:
    assert encode_v1(client, local, family) == expected


V2_CASES = [
    pytest.param(
        AF_INET,
        ("192.168.0.1", 56324),
        ("192.168.0.11", 443),
        "21 11 000c  c0a80001 c0a8000b  dc04 01bb",
        id="tcp4-spec-example-addresses",
    ),
    pytest.param(
        AF_INET,
        ("0.0.0.0", 0),
        ("255.255.255.255", 65535),
        "21 11 000c  00000000 ffffffff  0000 ffff",
        id="tcp4-extremes",
    ),
    pytest.param(
        AF_INET6,
        ("::1", 40000, 0, 0),
        ("2001:db8::9", 8080, 0, 0),
        "21 21 0024  00000000000000000000000000000001 20010db8000000000000000000000009  9c40 1f90",
        id="tcp6",
    ),
    pytest.param(
        AF_INET6,
        ("fe80::1%lo", 1, 0, 1),
        ("fe80::2%lo", 2, 0, 1),
        "21 21 0024  fe800000000000000000000000000001 fe800000000000000000000000000002  0001 0002",
        id="tcp6-scope-dropped",
    ),
    pytest.param(
        AF_INET6,
        ("::ffff:192.0.2.7", 51334, 0, 0),
        ("::ffff:127.0.0.1", 8080, 0, 0),
        "21 11 000c  c0000207 7f000001  c886 1f90",
        id="mapped-sent-as-tcp4",
    ),
    pytest.param(AF_UNIX, "", "/run/app.sock", "20 00 0000", id="unix-local"),
    pytest.param(AF_UNIX, b"\0peer", b"\0app", "20 00 0000", id="unix-abstract-local"),
    pytest.param(AF_VSOCK, (3, 1234), (2, 80), "20 00 0000", id="vsock-local"),
]


@pytest.mark.parametrize(("family", "client", "local", "after_signature"), V2_CASES)
def test_v2_exact_bytes(family: int, client: Any, local: Any, after_signature: str) -> None:
    assert encode_v2(client, local, family) == SIGNATURE + bytes.fromhex(after_signature)


def test_v2_signature_constant() -> None:
    assert V2_SIGNATURE == SIGNATURE


# --- every field, through the decoder --------------------------------------------------

FIELD_CASES = [
    pytest.param(
        AF_INET,
        ("192.168.0.1", 56324),
        ("192.168.0.11", 443),
        ProxyHeader(
            version=2,
            command="PROXY",
            family="INET",
            protocol="STREAM",
            source_address=IPv4("192.168.0.1"),
            destination_address=IPv4("192.168.0.11"),
            source_port=56324,
            destination_port=443,
            header_length=28,
            v2_version_command=0x21,
            v2_family_protocol=0x11,
            v2_length=12,
        ),
        id="tcp4",
    ),
    pytest.param(
        AF_INET6,
        ("2001:db8::7", 51334, 0, 0),
        ("::1", 443, 0, 0),
        ProxyHeader(
            version=2,
            command="PROXY",
            family="INET6",
            protocol="STREAM",
            source_address=IPv6("2001:db8::7"),
            destination_address=IPv6("::1"),
            source_port=51334,
            destination_port=443,
            header_length=52,
            v2_version_command=0x21,
            v2_family_protocol=0x21,
            v2_length=36,
        ),
        id="tcp6",
    ),
    pytest.param(
        AF_INET6,
        ("::ffff:10.1.2.3", 1024, 0, 0),
        ("::ffff:127.0.0.1", 80, 0, 0),
        ProxyHeader(
            version=2,
            command="PROXY",
            family="INET",
            protocol="STREAM",
            source_address=IPv4("10.1.2.3"),
            destination_address=IPv4("127.0.0.1"),
            source_port=1024,
            destination_port=80,
            header_length=28,
            v2_version_command=0x21,
            v2_family_protocol=0x11,
            v2_length=12,
        ),
        id="mapped",
    ),
    pytest.param(
        AF_UNIX,
        "",
        "/run/app.sock",
        ProxyHeader(
            version=2,
            command="LOCAL",
            family="UNSPEC",
            protocol="UNSPEC",
            source_address=None,
            destination_address=None,
            source_port=None,
            destination_port=None,
            header_length=16,
            v2_version_command=0x20,
            v2_family_protocol=0x00,
            v2_length=0,
        ),
        id="unix",
    ),
]


@pytest.mark.parametrize(("family", "client", "local", "expected"), FIELD_CASES)
def test_v2_every_field(family: int, client: Any, local: Any, expected: ProxyHeader) -> None:
    payload = b"GET / HTTP/1.1\r\n\r\n"
    header, rest = decode(encode_v2(client, local, family) + payload)
    assert header == expected
    assert rest == payload


def test_v1_every_field() -> None:
    header, rest = decode(encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443), AF_INET))
    assert header == ProxyHeader(
        version=1,
        command="PROXY",
        family="INET",
        protocol="STREAM",
        source_address=IPv4("192.168.0.1"),
        destination_address=IPv4("192.168.0.11"),
        source_port=56324,
        destination_port=443,
        header_length=47,
    )
    assert rest == b""


def test_v1_unknown_decodes_as_no_addresses() -> None:
    header, _ = decode(encode_v1("", "/run/app.sock", AF_UNIX))
    assert (header.family, header.protocol, header.source_address) == ("UNSPEC", "UNSPEC", None)
    assert header.header_length == 15


# --- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("encode", [encode_v1, encode_v2], ids=["v1", "v2"])
@pytest.mark.parametrize(
    ("family", "client", "local", "message"),
    [
        (AF_INET, ("1.2.3", 1), ("1.2.3.4", 2), "invalid IPv4 address '1.2.3'"),
        (AF_INET, ("1.2.3.4", 1), ("01.2.3.4", 2), "invalid IPv4 address '01.2.3.4'"),
        (AF_INET, ("::1", 1), ("1.2.3.4", 2), "invalid IPv4 address '::1'"),
        (AF_INET, ("localhost", 1), ("1.2.3.4", 2), "invalid IPv4 address 'localhost'"),
        (AF_INET6, ("1.2.3.4", 1, 0, 0), ("::1", 2, 0, 0), "invalid IPv6 address '1.2.3.4'"),
        (AF_INET6, ("::1", 1, 0, 0), ("1::2::3", 2, 0, 0), "invalid IPv6 address '1::2::3'"),
        (AF_INET6, ("::1", 1, 0, 0), ("%lo", 2, 0, 0), "invalid IPv6 address '%lo'"),
        (AF_INET, ("1.2.3.4", 65536), ("1.2.3.4", 2), "port"),
        (AF_INET, ("1.2.3.4", 1), ("1.2.3.4", -1), "port"),
        (AF_INET6, ("::1", 70000, 0, 0), ("::1", 2, 0, 0), "port"),
    ],
)
def test_invalid_input_is_value_error(
    encode: Encoder, family: int, client: Any, local: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        encode(client, local, family)


def test_header_encoder_picks_the_version() -> None:
    assert header_encoder(1) is encode_v1
    assert header_encoder(2) is encode_v2
    with pytest.raises(ValueError, match="unknown PROXY protocol version 3"):
        header_encoder(3)  # type: ignore[arg-type]


# --- real sockets: what a worker will pass ---------------------------------------------


def _accepted_pair(family: int, host: str, connect_host: str) -> tuple[socket.socket, ...]:
    listener = socket.socket(family, socket.SOCK_STREAM)
    if family == AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind((host, 0))
    listener.listen()
    client = socket.create_connection((connect_host, listener.getsockname()[1]), timeout=5)
    accepted, _ = listener.accept()
    return listener, client, accepted


@pytest.mark.parametrize("encode", [encode_v1, encode_v2], ids=["v1", "v2"])
@pytest.mark.parametrize(
    ("family", "host", "connect_host", "expected_family", "expected_host"),
    [
        (AF_INET, "127.0.0.1", "127.0.0.1", "INET", IPv4("127.0.0.1")),
        (AF_INET6, "::1", "::1", "INET6", IPv6("::1")),
        (AF_INET6, "::", "127.0.0.1", "INET", IPv4("127.0.0.1")),  # dual-stack listener
    ],
    ids=["ipv4", "ipv6", "dual-stack-ipv4-client"],
)
def test_real_socket_addresses(
    encode: Encoder,
    family: int,
    host: str,
    connect_host: str,
    expected_family: str,
    expected_host: Any,
) -> None:
    listener, client, accepted = _accepted_pair(family, host, connect_host)
    with listener, client, accepted:
        header, _ = decode(encode(accepted.getpeername(), accepted.getsockname(), accepted.family))
        assert header.family == expected_family
        assert header.source_address == expected_host
        assert header.source_port == client.getsockname()[1]
        assert header.destination_address == expected_host
        assert header.destination_port == listener.getsockname()[1]


def test_real_unix_socket_is_unknown_and_local(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    with socket.socket(AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        with socket.socket(AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            accepted, _ = listener.accept()
            with accepted:
                peer, local, family = (
                    accepted.getpeername(),
                    accepted.getsockname(),
                    accepted.family,
                )
                assert encode_v1(peer, local, family) == b"PROXY UNKNOWN\r\n"
                assert encode_v2(peer, local, family) == SIGNATURE + b"\x20\x00\x00\x00"


# --- properties ---------------------------------------------------------------------

ports = st.integers(min_value=0, max_value=65535)
ipv4s = st.ip_addresses(v=4).map(str)
# ip_addresses(v=6) covers all of IPv6 with weight on the special ranges; add the
# inet_ntop(3) dotted-tail shapes (IPv4-compatible and -mapped) explicitly.
ipv6s = st.one_of(
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=4).map(lambda v4: f"::{v4}"),
    st.ip_addresses(v=4).map(lambda v4: f"::ffff:{v4}"),
    st.integers(min_value=0, max_value=2**128 - 1).map(lambda n: str(IPv6(n))),
)
flowinfos = st.integers(min_value=0, max_value=2**20 - 1)
scope_ids = st.integers(min_value=0, max_value=2**32 - 1)
encoders = st.sampled_from([encode_v1, encode_v2])
payloads = st.binary(max_size=64)


@given(encoders, ipv4s, ports, ipv4s, ports, payloads)
@example(encode_v1, "255.255.255.255", 65535, "255.255.255.255", 65535, b"")
def test_ipv4_round_trip(
    encode: Encoder, src: str, sport: int, dst: str, dport: int, payload: bytes
) -> None:
    encoded = encode((src, sport), (dst, dport), AF_INET)
    header, rest = decode(encoded + payload)
    assert header.version == (1 if encode is encode_v1 else 2)
    assert (header.command, header.family, header.protocol) == ("PROXY", "INET", "STREAM")
    assert header.source_address == IPv4(src)
    assert header.destination_address == IPv4(dst)
    assert (header.source_port, header.destination_port) == (sport, dport)
    assert header.header_length == len(encoded)
    assert rest == payload


@given(encoders, ipv6s, ports, flowinfos, scope_ids, ipv6s, ports, payloads)
@example(encode_v1, ALL_F, 65535, 0, 0, ALL_F, 65535, b"")
@example(encode_v2, "::ffff:1.2.3.4", 1, 0, 0, "::ffff:5.6.7.8", 2, b"")
def test_ipv6_round_trip(
    encode: Encoder,
    src: str,
    sport: int,
    flowinfo: int,
    scope_id: int,
    dst: str,
    dport: int,
    payload: bytes,
) -> None:
    encoded = encode((src, sport, flowinfo, scope_id), (dst, dport, 0, scope_id), AF_INET6)
    header, rest = decode(encoded + payload)
    src_v6, dst_v6 = IPv6(src), IPv6(dst)
    if src_v6.ipv4_mapped is not None and dst_v6.ipv4_mapped is not None:
        assert header.family == "INET"
        assert header.source_address == src_v6.ipv4_mapped
        assert header.destination_address == dst_v6.ipv4_mapped
    else:
        assert header.family == "INET6"
        assert header.source_address == src_v6
        assert header.destination_address == dst_v6
    assert (header.command, header.protocol) == ("PROXY", "STREAM")
    assert (header.source_port, header.destination_port) == (sport, dport)
    assert header.header_length == len(encoded)
    assert rest == payload


@given(ipv6s, ports, ipv6s, ports)
def test_v1_length_and_canonical_text(src: str, sport: int, dst: str, dport: int) -> None:
    line = encode_v1((src, sport, 0, 0), (dst, dport, 0, 0), AF_INET6)
    assert len(line) <= 107  # spec 2.1: the receiver's limit, CRLF included
    assert len(line) <= 104  # and in fact the TCP6 worst case
    fields = line[: -len(b"\r\n")].decode("ascii").split(" ")
    if fields[1] == "TCP6":
        _assert_rfc5952(fields[2])
        _assert_rfc5952(fields[3])


@given(ipv4s, ports, ipv4s, ports)
def test_v1_tcp4_length(src: str, sport: int, dst: str, dport: int) -> None:
    assert len(encode_v1((src, sport), (dst, dport), AF_INET)) <= 56


@given(
    st.one_of(
        st.tuples(st.just(AF_INET), ipv4s, ports, ipv4s, ports),
        st.tuples(st.just(AF_INET6), ipv6s, ports, ipv6s, ports),
    )
)
def test_v2_length_field_matches(case: tuple[int, str, int, str, int]) -> None:
    family, src, sport, dst, dport = case
    client: tuple[Any, ...] = (src, sport) if family == AF_INET else (src, sport, 0, 0)
    local: tuple[Any, ...] = (dst, dport) if family == AF_INET else (dst, dport, 0, 0)
    encoded = encode_v2(client, local, family)
    length = int.from_bytes(encoded[14:16], "big")
    assert len(encoded) == 16 + length
    assert length == (12 if encoded[13] == 0x11 else 36)
    header, _ = decode(encoded)
    assert header.v2_length == length


def _assert_rfc5952(text: str) -> None:
    """Lower-case hex groups without leading zeros, and "::" exactly where RFC 5952 4.2
    puts it: over the longest run of two or more zero groups, the first if tied."""
    assert text == text.lower() and "." not in text
    groups = IPv6(text).exploded.split(":")
    runs: list[tuple[int, int]] = []  # (length, -start) of each run of zero groups
    start = None
    for index, group in enumerate([*groups, "x"]):
        if group == "0000" and start is None:
            start = index
        elif group != "0000" and start is not None:
            runs.append((index - start, -start))
            start = None
    best = max(runs, default=(0, 0))
    if best[0] >= 2:
        head = groups[: -best[1]]
        tail = groups[-best[1] + best[0] :]
        expected = ":".join(f"{int(g, 16):x}" for g in head) + "::"
        expected += ":".join(f"{int(g, 16):x}" for g in tail)
    else:
        expected = ":".join(f"{int(g, 16):x}" for g in groups)
    assert text == expected


# --- the decoder rejects what the spec rejects ----------------------------------------

V1_GOOD = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
V2_TCP4 = SIGNATURE + bytes.fromhex("2111000c c0a80001 c0a8000b dc04 01bb")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "neither a v1 'PROXY' nor a v2 signature"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n", "lone CR or LF"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r443\r\n", "lone CR or LF"),
        (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "followed by one space"),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "single spaces"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "single spaces"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "6 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "6 fields"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol 'tcp4'"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol 'UDP4'"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "canonical IPv4"),
        (b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", "canonical IPv4"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "canonical IPv4"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "canonical IPv4"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad IPv6 group"),
        (b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n", "bad IPv6 group"),
        (b"PROXY TCP6 fe80::1%lo ::1 1 2\r\n", "bad IPv6 group"),
        (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "more than one '::'"),
        (b"PROXY TCP6 1:2:3:4:5:6:7 ::1 1 2\r\n", "7 groups instead of 8"),
        (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "9 groups instead of 8"),
        (b"PROXY TCP6 1:2:3:4::5:6:7:8 ::1 1 2\r\n", "stands for no zeros"),
        (b"PROXY TCP6 12345:: ::1 1 2\r\n", "bad IPv6 group"),
        (b"PROXY TCP6 :1:: ::1 1 2\r\n", "bad IPv6 group"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0x2\r\n", "not a port"),
        (b"PROXY UNKNOWN \xff\r\n", "not US-ASCII"),
        (b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n", "no CRLF in the first 107 bytes"),
        (SIGNATURE + bytes.fromhex("1111000c") + bytes(12), "version 1 instead of 2"),
        (SIGNATURE + bytes.fromhex("3111000c") + bytes(12), "version 3 instead of 2"),
        (SIGNATURE + bytes.fromhex("2211000c") + bytes(12), "unassigned command 0x2"),
        (SIGNATURE + bytes.fromhex("2f11000c") + bytes(12), "unassigned command 0xf"),
        (SIGNATURE + bytes.fromhex("2141000c") + bytes(12), "unspecified address family 0x4"),
        (SIGNATURE + bytes.fromhex("2113000c") + bytes(12), "unspecified transport protocol"),
        (SIGNATURE + bytes.fromhex("2101000c") + bytes(12), "unexpected family/protocol"),
        (SIGNATURE + bytes.fromhex("2110000c") + bytes(12), "unexpected family/protocol"),
        (SIGNATURE + bytes.fromhex("2111000b") + bytes(11), "short of INET's 12"),
        (SIGNATURE + bytes.fromhex("21210020") + bytes(32), "short of INET6's 36"),
        (SIGNATURE + bytes.fromhex("2131000c") + bytes(12), "short of UNIX's 216"),
        (SIGNATURE + bytes.fromhex("2111000e") + bytes(14), "2 stray bytes"),
        (SIGNATURE + bytes.fromhex("21110010") + bytes(12) + b"\x04\x00\x05\x00", "runs past"),
        (SIGNATURE[:-1] + b"\x0b" + bytes.fromhex("2111000c") + bytes(12), "neither"),
    ],
)
def test_decoder_rejects(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message) as caught:
        decode(data)
    assert not isinstance(caught.value, ProxyHeaderIncomplete)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"PRO",
        b"PROXY TCP4 1.2.3.4",
        V1_GOOD[:-1],
        SIGNATURE[:5],
        SIGNATURE,
        V2_TCP4[:16],
        V2_TCP4[:-1],
    ],
)
def test_decoder_incomplete(data: bytes) -> None:
    with pytest.raises(ProxyHeaderIncomplete):
        decode(data)


def test_decoder_accepts_spec_worst_case_v1_line() -> None:
    line = f"PROXY UNKNOWN {ALL_F} {ALL_F} 65535 65535\r\n".encode()
    assert len(line) == 107
    header, rest = decode(line + b"x")
    assert (header.family, header.header_length, rest) == ("UNSPEC", 107, b"x")


def test_decoder_v2_local_skips_any_block() -> None:
    # spec 2.2: LOCAL must not be assumed to have length 0; the block is discarded
    header, rest = decode(SIGNATURE + bytes.fromhex("2011000c") + bytes(12) + b"data")
    assert (header.command, header.source_address, header.header_length) == ("LOCAL", None, 28)
    assert rest == b"data"


def test_decoder_v2_tlvs_udp_and_unix() -> None:
    noop = b"\x04\x00\x02ab"
    header, _ = decode(SIGNATURE + bytes.fromhex("21120011") + bytes(12) + noop)
    assert (header.protocol, header.tlvs) == ("DGRAM", ((0x04, b"ab"),))
    source, destination = b"/a".ljust(108, b"\0"), b"/b".ljust(108, b"\0")
    header, _ = decode(SIGNATURE + bytes.fromhex("213100d8") + source + destination)
    assert (header.family, header.source_address, header.destination_address) == (
        "UNIX",
        source,
        destination,
    )


def test_read_header_assembles_pieces() -> None:
    # SOCK_SEQPACKET keeps message boundaries, so each recv() gets one piece
    header_bytes = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), AF_INET)
    left, right = socket.socketpair(AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        for piece in (header_bytes[:5], header_bytes[5:20], header_bytes[20:] + b"tail"):
            left.send(piece)
        header, rest = read_header(right, timeout=5)
    assert header.source_address == IPv4("192.0.2.1")
    assert rest == b"tail"


def test_read_header_eof_before_whole_header() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"PROXY TCP4 1.2.3.4")
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(ProxyHeaderError, match="EOF before a whole header"):
            read_header(right, timeout=5)
