"""Hypothesis strategies for PROXY protocol headers, each with the result a receiver must
give: shared by the parser's own tests and the Python-versus-C differential tests.

The expected results are built here from what was put into the bytes (an address packed,
then written in one of the spellings the spec allows), not by the parser under test.
"""

from __future__ import annotations

import socket
import struct
from typing import Literal

import pytest
from hypothesis import assume
from hypothesis import strategies as st

from forkproxy.relay.proxy_header import ProxyHeader

AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX = 0, 2, 10, 1
SIGNATURE = bytes.fromhex("0D0A0D0A000D0A515549540A")  # proxy-protocol.txt 2.2, typed out
V2_MAX_LENGTH = 2048

ports = st.integers(0, 65535)
ipv4_packed = st.binary(min_size=4, max_size=4)
ipv6_packed = st.one_of(
    st.binary(min_size=16, max_size=16),
    ipv4_packed.map(lambda v4: bytes(10) + b"\xff\xff" + v4),  # mapped
    st.lists(st.sampled_from([0, 0, 1, 0xFFFF]), min_size=8, max_size=8).map(
        lambda groups: struct.pack("!8H", *groups)  # runs of zeros to compress
    ),
)


def _v6_spellings(packed: bytes) -> st.SearchStrategy[str]:
    """The text forms v1 allows for one IPv6 address (and that HAProxy and nginx write)."""
    groups = struct.unpack("!8H", packed)
    ntop = socket.inet_ntop(socket.AF_INET6, packed)
    spellings = [
        ntop,  # may end in a dotted IPv4 tail
        ntop.upper(),
        ":".join(f"{g:x}" for g in groups),
        ":".join(f"{g:04x}" for g in groups),  # leading zeros inside a group are allowed
        ":".join(f"{g:x}" for g in groups[:6]) + ":" + socket.inet_ntop(AF_INET, packed[12:]),
    ]
    zero_runs = [i for i in range(8) if groups[i] == 0]
    if zero_runs:
        start = zero_runs[0]
        end = start
        while end < 8 and groups[end] == 0:
            end += 1
        head = ":".join(f"{g:X}" for g in groups[:start])
        tail = ":".join(f"{g:X}" for g in groups[end:])
        spellings.append(f"{head}::{tail}")  # the first zero run, not the longest
    return st.sampled_from(spellings)


def _expected(
    version: Literal[1, 2],
    family: int,
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    length: int,
    command: Literal["PROXY", "LOCAL"] = "PROXY",
) -> ProxyHeader:
    return ProxyHeader(version, command, family, source, destination, length)


@st.composite
def v1_tcp4(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    src, dst = draw(ipv4_packed), draw(ipv4_packed)
    sport, dport = draw(ports), draw(ports)
    a, b = socket.inet_ntop(AF_INET, src), socket.inet_ntop(AF_INET, dst)
    header = f"PROXY TCP4 {a} {b} {sport} {dport}\r\n".encode()
    return header, _expected(1, AF_INET, (a, sport), (b, dport), len(header))


@st.composite
def v1_tcp6(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    src, dst = draw(ipv6_packed), draw(ipv6_packed)
    sport, dport = draw(ports), draw(ports)
    a, b = draw(_v6_spellings(src)), draw(_v6_spellings(dst))
    header = f"PROXY TCP6 {a} {b} {sport} {dport}\r\n".encode()
    assume(len(header) <= 107)  # dotted tails of addresses that are not IPv4-mapped run long
    expected_a = socket.inet_ntop(AF_INET6, src)
    expected_b = socket.inet_ntop(AF_INET6, dst)
    return header, _expected(1, AF_INET6, (expected_a, sport), (expected_b, dport), len(header))


@st.composite
def v1_unknown(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    # spec 2.1: for UNKNOWN the receiver ignores anything before the CRLF
    junk = draw(st.binary(max_size=107 - 16).filter(lambda b: b"\r" not in b and b"\n" not in b))
    header = b"PROXY UNKNOWN" + (b" " + junk if draw(st.booleans()) else b"") + b"\r\n"
    return header, _expected(1, AF_UNSPEC, None, None, len(header))


tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=5).map(
    lambda items: b"".join(bytes([kind]) + struct.pack("!H", len(v)) + v for kind, v in items)
)


@st.composite
def v2_proxy(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    family_protocol = draw(
        st.sampled_from([0x11, 0x21, 0x12, 0x22, 0x31, 0x32, 0x00, 0x01, 0x02, 0x10, 0x20, 0x30])
    )
    family = (AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX)[family_protocol >> 4]
    source = destination = None
    if family_protocol in (0x11, 0x12):
        src, dst, sport, dport = draw(ipv4_packed), draw(ipv4_packed), draw(ports), draw(ports)
        block = src + dst + struct.pack("!HH", sport, dport)
        if family_protocol == 0x11:
            source = (socket.inet_ntop(AF_INET, src), sport)
            destination = (socket.inet_ntop(AF_INET, dst), dport)
    elif family_protocol in (0x21, 0x22):
        src, dst, sport, dport = draw(ipv6_packed), draw(ipv6_packed), draw(ports), draw(ports)
        block = src + dst + struct.pack("!HH", sport, dport)
        if family_protocol == 0x21:
            source = (socket.inet_ntop(AF_INET6, src), sport)
            destination = (socket.inet_ntop(AF_INET6, dst), dport)
    elif family_protocol in (0x31, 0x32):
        block = draw(st.binary(min_size=216, max_size=216))
    else:  # unspecified family or protocol: an opaque block, skipped unread
        block = draw(st.binary(max_size=64))
    block += draw(tlvs)
    header = SIGNATURE + bytes([0x21, family_protocol]) + struct.pack("!H", len(block)) + block
    return header, _expected(2, family, source, destination, len(header))


@st.composite
def v2_local(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    # spec 2.2: LOCAL discards the whole block, family byte included
    block = draw(st.binary(max_size=300))
    header = SIGNATURE + bytes([0x20, draw(st.integers(0, 255))]) + struct.pack("!H", len(block))
    header += block
    return header, _expected(2, AF_UNSPEC, None, None, len(header), command="LOCAL")


valid_headers = st.one_of(v1_tcp4(), v1_tcp6(), v1_unknown(), v2_proxy(), v2_local())


# --- tables of exact results ------------------------------------------------------------

LOCAL, PROXY = 0x20, 0x21
ALL_F = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def v2(version_command: int, family_protocol: int, block: bytes, length: int = -1) -> bytes:
    length = len(block) if length < 0 else length
    return SIGNATURE + bytes([version_command, family_protocol]) + struct.pack("!H", length) + block


def tcp4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    addresses = socket.inet_pton(AF_INET, src) + socket.inet_pton(AF_INET, dst)
    return addresses + struct.pack("!HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def header(
    version: Literal[1, 2],
    family: int,
    src: tuple[str, int] | None,
    dst: tuple[str, int] | None,
    length: int,
    command: Literal["PROXY", "LOCAL"] = "PROXY",
) -> ProxyHeader:
    return ProxyHeader(version, command, family, src, dst, length)


V4_LINE = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
V6_LONGEST = f"PROXY TCP6 {ALL_F} {ALL_F} 65535 65535\r\n".encode()
UNKNOWN_WORST = f"PROXY UNKNOWN {ALL_F} {ALL_F} 65535 65535\r\n".encode()
AWS_VPCE = tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9")

GOOD = [
    pytest.param(
        V4_LINE + b"GET /",
        header(1, AF_INET, ("192.168.0.1", 56324), ("192.168.0.11", 443), 47),
        id="v1-spec-example",
    ),
    pytest.param(
        b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n",
        header(1, AF_INET, ("255.255.255.255", 65535), ("0.0.0.0", 0), 44),
        id="v1-tcp4-extremes",
    ),
    pytest.param(
        V6_LONGEST,
        header(1, AF_INET6, (ALL_F, 65535), (ALL_F, 65535), 104),
        id="v1-tcp6-longest-104",
    ),
    pytest.param(
        b"PROXY TCP6 2001:DB8::1 0000:0000:0000:0000:0000:0000:0000:0001 1 2\r\n",
        header(1, AF_INET6, ("2001:db8::1", 1), ("::1", 2), 68),
        id="v1-tcp6-upper-and-leading-zeros",
    ),
    pytest.param(
        b"PROXY TCP6 ::ffff:192.0.2.1 1:2:3:4:5:6:7:: 1 2\r\n",
        header(1, AF_INET6, ("::ffff:192.0.2.1", 1), ("1:2:3:4:5:6:7:0", 2), 49),
        id="v1-tcp6-dotted-tail-and-one-zero-group",
    ),
    pytest.param(
        b"PROXY TCP6 :: ::1.2.3.4 0 0\r\n",
        header(1, AF_INET6, ("::", 0), ("::1.2.3.4", 0), 29),
        id="v1-tcp6-all-zeros",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", header(1, AF_UNSPEC, None, None, 15), id="v1-unknown-short"),
    pytest.param(
        UNKNOWN_WORST + b"x", header(1, AF_UNSPEC, None, None, 107), id="v1-unknown-worst-case-107"
    ),
    pytest.param(
        b"PROXY UNKNOWN \x00\xff anything\r\n",
        header(1, AF_UNSPEC, None, None, 27),
        id="v1-unknown-rest-ignored",
    ),
    pytest.param(
        v2(PROXY, 0x11, tcp4_block("10.0.0.1", "10.0.0.2", 1234, 80)) + b"data",
        header(2, AF_INET, ("10.0.0.1", 1234), ("10.0.0.2", 80), 28),
        id="v2-tcp4",
    ),
    pytest.param(
        v2(PROXY, 0x21, bytes(15) + b"\x01" + bytes(16) + b"\x00\x01\x00\x02"),
        header(2, AF_INET6, ("::1", 1), ("::", 2), 52),
        id="v2-tcp6",
    ),
    pytest.param(
        v2(PROXY, 0x11, tcp4_block("1.2.3.4", "5.6.7.8", 1, 2) + AWS_VPCE + tlv(4, b"")),
        header(2, AF_INET, ("1.2.3.4", 1), ("5.6.7.8", 2), 28 + 26 + 3),
        id="v2-tcp4-tlvs",
    ),
    pytest.param(
        v2(PROXY, 0x11, tcp4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0xEE, bytes(2048 - 28 - 3))),
        header(2, AF_INET, ("1.2.3.4", 1), ("5.6.7.8", 2), 2048),
        id="v2-longest-accepted",
    ),
    pytest.param(
        v2(LOCAL, 0x00, b""), header(2, AF_UNSPEC, None, None, 16, "LOCAL"), id="v2-local"
    ),
    pytest.param(
        v2(LOCAL, 0xFF, b"\x01\x02"),
        header(2, AF_UNSPEC, None, None, 18, "LOCAL"),
        id="v2-local-family-ignored",
    ),
    pytest.param(
        v2(LOCAL, 0x11, tcp4_block("1.2.3.4", "5.6.7.8", 1, 2)),
        header(2, AF_UNSPEC, None, None, 28, "LOCAL"),
        id="v2-local-addresses-ignored",
    ),
    pytest.param(v2(PROXY, 0x00, b""), header(2, AF_UNSPEC, None, None, 16), id="v2-unspec"),
    pytest.param(
        v2(PROXY, 0x10, b"\x01\x02\x03"),
        header(2, AF_INET, None, None, 19),
        id="v2-inet-unspec-protocol-opaque",
    ),
    pytest.param(
        v2(PROXY, 0x31, bytes(216)), header(2, AF_UNIX, None, None, 232), id="v2-unix-own-addresses"
    ),
    pytest.param(
        v2(PROXY, 0x12, tcp4_block("1.2.3.4", "5.6.7.8", 1, 2)),
        header(2, AF_INET, None, None, 28),
        id="v2-udp4-own-addresses",
    ),
]

NEED_MORE = [
    pytest.param(b"", 15, id="nothing"),
    pytest.param(b"P", 15, id="v1-first-byte"),
    pytest.param(b"PROXY TCP4 1.2.3.4", 19, id="v1-midway"),
    pytest.param(b"PROXY UNKNOWN\r", 15, id="v1-cr-last"),
    pytest.param(UNKNOWN_WORST[:106], 107, id="v1-106-bytes"),
    pytest.param(b"\r", 16, id="v2-first-byte"),
    pytest.param(SIGNATURE + b"\x21", 16, id="v2-13-bytes"),
    pytest.param(v2(PROXY, 0x11, b"")[:15], 16, id="v2-15-bytes"),
    pytest.param(v2(PROXY, 0x11, b"", length=12), 28, id="v2-fixed-part-only"),
    pytest.param(v2(PROXY, 0x11, b"", length=2032), 2048, id="v2-longest-length"),
]

BAD = [
    pytest.param(b"GET / HTTP/1.1\r\n", "bad-signature", id="http"),
    pytest.param(b"\x16\x03\x01", "bad-signature", id="tls"),
    pytest.param(b"PROXX", "bad-signature", id="v1-typo"),
    pytest.param(b"proxy ", "bad-signature", id="v1-lowercase"),
    pytest.param(b"PROXY\r\n", "bad-signature", id="v1-no-space"),
    pytest.param(b"\r\n\r\n\x00\r\nQUIT\r", "bad-signature", id="v2-last-signature-byte"),
    pytest.param(b"\r\r", "bad-signature", id="v2-second-byte"),
    pytest.param(b"PROXY UNKNOWN " + b"a" * 93, "too-long", id="v1-107-without-crlf"),
    pytest.param(UNKNOWN_WORST[:-2] + b"f\r\n", "too-long", id="v1-line-of-108"),
    pytest.param(UNKNOWN_WORST[:-2] + b"f\r", "too-long", id="v1-cr-at-107"),
    pytest.param(v2(PROXY, 0x11, b"", length=2033), "too-long", id="v2-length-2033"),
    pytest.param(v2(LOCAL, 0x00, b"", length=65535), "too-long", id="v2-local-length-65535"),
    pytest.param(V4_LINE[:-2] + b"\n", "bad-v1-syntax", id="v1-lone-lf"),
    pytest.param(V4_LINE[:-1] + b"X", "bad-v1-syntax", id="v1-lone-cr"),
    pytest.param(b"PROXY \r\n", "bad-v1-syntax", id="v1-empty"),
    pytest.param(
        b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad-v1-syntax", id="v1-double-space-first"
    ),
    pytest.param(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "bad-v1-syntax", id="v1-double-space"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "bad-v1-syntax", id="v1-trailing-space"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "bad-v1-syntax", id="v1-field-missing"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "bad-v1-syntax", id="v1-field-too-many"),
    pytest.param(b"PROXY TCP4\r\n", "bad-v1-syntax", id="v1-protocol-only"),
    pytest.param(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown-family", id="v1-tcp5"),
    pytest.param(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown-family", id="v1-udp4"),
    pytest.param(b"PROXY UNKNOWNX\r\n", "unknown-family", id="v1-unknownx"),
    pytest.param(v2(PROXY, 0x41, b""), "unknown-family", id="v2-family-4"),
    pytest.param(v2(PROXY, 0x13, b""), "unknown-protocol", id="v2-protocol-3"),
    pytest.param(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad-address", id="v1-leading-zero"),
    pytest.param(b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", "bad-address", id="v1-octet-256"),
    pytest.param(b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad-address", id="v1-three-octets"),
    pytest.param(b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "bad-address", id="v1-five-octets"),
    pytest.param(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad-address", id="v1-tcp4-with-ipv6"),
    pytest.param(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad-address", id="v1-tcp6-with-ipv4"),
    pytest.param(b"PROXY TCP6 ::1%lo ::1 1 2\r\n", "bad-address", id="v1-zone"),
    pytest.param(b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "bad-address", id="v1-two-gaps"),
    pytest.param(b"PROXY TCP6 12345:: ::1 1 2\r\n", "bad-address", id="v1-five-hex-digits"),
    pytest.param(b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "bad-address", id="v1-nine-groups"),
    pytest.param(b"PROXY TCP6 1:2:3:4:5:6:7 ::1 1 2\r\n", "bad-address", id="v1-seven-groups"),
    pytest.param(
        b"PROXY TCP6 1:2:3:4::5:6:7:8 ::1 1 2\r\n", "bad-address", id="v1-gap-for-nothing"
    ),
    pytest.param(b"PROXY TCP6 1.2.3.4:: ::1 1 2\r\n", "bad-address", id="v1-dotted-not-last"),
    pytest.param(b"PROXY TCP6 :1:2:3:4:5:6:7 ::1 1 2\r\n", "bad-address", id="v1-lone-colon"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad-address", id="v1-port-65536"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "bad-address", id="v1-port-leading-zero"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad-address", id="v1-port-negative"),
    pytest.param(SIGNATURE + b"\x11", "bad-version", id="v2-version-1"),
    pytest.param(SIGNATURE + b"\x31", "bad-version", id="v2-version-3"),
    pytest.param(SIGNATURE + b"\x22", "bad-command", id="v2-command-2"),
    pytest.param(v2(PROXY, 0x11, b"", length=11), "bad-length", id="v2-tcp4-length-11"),
    pytest.param(v2(PROXY, 0x21, b"", length=35), "bad-length", id="v2-tcp6-length-35"),
    pytest.param(v2(PROXY, 0x31, b"", length=215), "bad-length", id="v2-unix-length-215"),
    pytest.param(
        v2(PROXY, 0x11, tcp4_block("1.2.3.4", "5.6.7.8", 1, 2) + b"\x04\x00"),
        "bad-tlv",
        id="v2-stray-bytes",
    ),
    pytest.param(
        v2(PROXY, 0x11, tcp4_block("1.2.3.4", "5.6.7.8", 1, 2) + b"\x04\x00\x05ab"),
        "bad-tlv",
        id="v2-tlv-overruns",
    ),
]
