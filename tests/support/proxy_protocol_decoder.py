"""A strict PROXY protocol header decoder, for tests only.

Written from HAProxy's proxy-protocol.txt (versions 1 and 2), independently of
`forkproxy.relay.proxy_protocol`, so that a test which round-trips through both is checking the
encoder against the spec rather than against itself. It never imports forkproxy.

Strict means: anything the spec says a receiver must reject is rejected, and where the
spec only says what a sender must send (canonical v1 addresses, no leading zeros, no
stray spaces, the expected v2 family/protocol bytes) this decoder holds the sender to it.
Every rejection is a `ProxyHeaderError`; input that is a valid prefix of a header but not
a whole one is a `ProxyHeaderIncomplete`, so a reader can wait for more bytes.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = [
    "Address",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderIncomplete",
    "decode",
    "read_header",
]

Address: TypeAlias = "ipaddress.IPv4Address | ipaddress.IPv6Address | bytes"
Command: TypeAlias = Literal["PROXY", "LOCAL"]
Family: TypeAlias = Literal["UNSPEC", "INET", "INET6", "UNIX"]
Protocol: TypeAlias = Literal["UNSPEC", "STREAM", "DGRAM"]

V1_PREFIX = b"PROXY"
V1_MAX_LENGTH = 107  # including CRLF (spec 2.1: the "worst case" UNKNOWN line)
V2_SIGNATURE = bytes.fromhex("0D0A0D0A000D0A515549540A")
V2_FIXED_LENGTH = 16

_V2_COMMANDS: dict[int, Command] = {0x0: "LOCAL", 0x1: "PROXY"}
_V2_FAMILIES: dict[int, Family] = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}
_V2_PROTOCOLS: dict[int, Protocol] = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
# spec 2.2, "In practice, the following protocol bytes are expected"
_V2_FAMILY_PROTOCOL_BYTES = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})
# bytes taken by the addresses (and ports) of each family
_V2_ADDRESS_LENGTHS: dict[Family, int] = {"INET": 12, "INET6": 36, "UNIX": 216}

_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_V1_IPV4_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_V1_IPV4 = re.compile(rf"{_V1_IPV4_OCTET}(?:\.{_V1_IPV4_OCTET}){{3}}")
_V1_IPV6_GROUP = re.compile(r"[0-9A-Fa-f]{1,4}")


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header; the message says why."""


class ProxyHeaderIncomplete(ProxyHeaderError):
    """The bytes so far are a valid start of a header, but not a whole one."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One decoded header, every field of the wire format.

    For v1, ``command`` is always PROXY and ``family``/``protocol`` are derived from
    TCP4 (INET, STREAM), TCP6 (INET6, STREAM) or UNKNOWN (UNSPEC, UNSPEC); the ``v2_*``
    fields are None. Addresses and ports are None where the header carries none (v1
    UNKNOWN, v2 LOCAL or UNSPEC). UNIX addresses are the raw 108-byte blocks.
    """

    version: Literal[1, 2]
    command: Command
    family: Family
    protocol: Protocol
    source_address: Address | None
    destination_address: Address | None
    source_port: int | None
    destination_port: int | None
    header_length: int  # bytes the header took on the wire, CRLF or TLVs included
    v2_version_command: int | None = None  # the 13th byte
    v2_family_protocol: int | None = None  # the 14th byte
    v2_length: int | None = None  # the 15th and 16th bytes: bytes after the fixed 16
    tlvs: tuple[tuple[int, bytes], ...] = ()


def decode(data: bytes) -> tuple[ProxyHeader, bytes]:
    """Decode the header at the start of ``data``; return it and the bytes after it."""
    if data[:12] == V2_SIGNATURE[: len(data)] and len(data) < 12:
        raise ProxyHeaderIncomplete(f"{len(data)} bytes could still become a v2 signature")
    if data.startswith(V2_SIGNATURE):
        return _decode_v2(data)
    if V1_PREFIX.startswith(data[:5]) and len(data) < 5:
        raise ProxyHeaderIncomplete(f"{len(data)} bytes could still become 'PROXY'")
    if data.startswith(V1_PREFIX):
        return _decode_v1(data)
    raise ProxyHeaderError(f"neither a v1 'PROXY' nor a v2 signature: {data[:16]!r}")


def read_header(
    sock: socket.socket, timeout: float = 5.0, *, max_bytes: int = 65551
) -> tuple[ProxyHeader, bytes]:
    """Receive from ``sock`` until a whole header has arrived; return it and any extra
    bytes that came with it. Raises `ProxyHeaderError` for a bad header, one cut short by
    EOF, or none within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    previous_timeout = sock.gettimeout()
    try:
        while True:
            try:
                return decode(data)
            except ProxyHeaderIncomplete:
                if len(data) >= max_bytes:
                    raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProxyHeaderError(f"no whole header within {timeout}s: {data!r}")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(max_bytes - len(data))
            except TimeoutError:
                raise ProxyHeaderError(f"no whole header within {timeout}s: {data!r}") from None
            if not chunk:
                raise ProxyHeaderError(f"EOF before a whole header: {data!r}")
            data += chunk
    finally:
        sock.settimeout(previous_timeout)


def _decode_v1(data: bytes) -> tuple[ProxyHeader, bytes]:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"v1: no CRLF in the first {V1_MAX_LENGTH} bytes")
        # a CR at the very end may be the start of the CRLF
        _check_v1_line_so_far(data[:-1] if data.endswith(b"\r") else data)
        raise ProxyHeaderIncomplete(f"v1: no CRLF yet in {len(data)} bytes")
    raw_line = data[:end]
    _check_v1_line_so_far(raw_line)
    line = raw_line.decode("ascii")
    rest = data[end + 2 :]
    header_length = end + 2
    if line == "PROXY UNKNOWN" or line.startswith("PROXY UNKNOWN "):
        # spec 2.1: for UNKNOWN the receiver must ignore the rest of the line
        return (
            ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC", None, None, None, None, header_length),
            rest,
        )
    fields = line.split(" ")
    if len(fields) != 6 or any(field == "" for field in fields):
        raise ProxyHeaderError(f"v1: want 6 fields separated by single spaces: {line!r}")
    _, inet, source, destination, source_port, destination_port = fields
    if inet == "TCP4":
        family: Family = "INET"
        source_address: Address = _v1_ipv4(source)
        destination_address: Address = _v1_ipv4(destination)
    elif inet == "TCP6":
        family = "INET6"
        source_address = _v1_ipv6(source)
        destination_address = _v1_ipv6(destination)
    else:
        raise ProxyHeaderError(f"v1: unknown protocol {inet!r}")
    header = ProxyHeader(
        1,
        "PROXY",
        family,
        "STREAM",
        source_address,
        destination_address,
        _v1_port(source_port),
        _v1_port(destination_port),
        header_length,
    )
    return header, rest


def _check_v1_line_so_far(line: bytes) -> None:
    if b"\r" in line or b"\n" in line:
        raise ProxyHeaderError(f"v1: a lone CR or LF in the line: {line!r}")
    if any(byte > 0x7F for byte in line):
        raise ProxyHeaderError(f"v1: the line is not US-ASCII: {line!r}")
    if not line.startswith(b"PROXY ") and len(line) >= 6:
        raise ProxyHeaderError(f"v1: 'PROXY' must be followed by one space: {line!r}")


def _v1_ipv4(text: str) -> ipaddress.IPv4Address:
    if not _V1_IPV4.fullmatch(text):
        raise ProxyHeaderError(f"v1: not a canonical IPv4 address: {text!r}")
    return ipaddress.IPv4Address(text)


def _v1_ipv6(text: str) -> ipaddress.IPv6Address:
    # spec 2.1: sets of hexadecimal digits separated by colons, at most one "::" standing
    # for zeros, exactly 128 bits; no dotted IPv4 tail, no zone.
    halves = text.split("::")
    if len(halves) > 2:
        raise ProxyHeaderError(f"v1: more than one '::' in {text!r}")
    groups = [half.split(":") if half else [] for half in halves]
    for half in groups:
        for group in half:
            if not _V1_IPV6_GROUP.fullmatch(group):
                raise ProxyHeaderError(f"v1: bad IPv6 group {group!r} in {text!r}")
    count = sum(len(half) for half in groups)
    if len(halves) == 1 and count != 8:
        raise ProxyHeaderError(f"v1: {count} groups instead of 8 in {text!r}")
    if len(halves) == 2 and count > 7:
        raise ProxyHeaderError(f"v1: '::' stands for no zeros in {text!r}")
    head = [int(group, 16) for group in groups[0]]
    tail = [int(group, 16) for group in groups[1]] if len(groups) == 2 else []
    words = head + [0] * (8 - len(head) - len(tail)) + tail
    return ipaddress.IPv6Address(b"".join(word.to_bytes(2, "big") for word in words))


def _v1_port(text: str) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyHeaderError(f"v1: not a port in 0..65535 without leading zeros: {text!r}")
    return int(text)


def _decode_v2(data: bytes) -> tuple[ProxyHeader, bytes]:
    if len(data) < V2_FIXED_LENGTH:
        raise ProxyHeaderIncomplete(f"v2: {len(data)} of the 16 fixed bytes")
    version_command = data[12]
    family_protocol = data[13]
    length = int.from_bytes(data[14:16], "big")
    if version_command >> 4 != 0x2:
        raise ProxyHeaderError(f"v2: version {version_command >> 4} instead of 2")
    command = _V2_COMMANDS.get(version_command & 0xF)
    if command is None:
        raise ProxyHeaderError(f"v2: unassigned command {version_command & 0xF:#x}")
    family = _V2_FAMILIES.get(family_protocol >> 4)
    protocol = _V2_PROTOCOLS.get(family_protocol & 0xF)
    if family is None:
        raise ProxyHeaderError(f"v2: unspecified address family {family_protocol >> 4:#x}")
    if protocol is None:
        raise ProxyHeaderError(f"v2: unspecified transport protocol {family_protocol & 0xF:#x}")
    if family_protocol not in _V2_FAMILY_PROTOCOL_BYTES:
        raise ProxyHeaderError(f"v2: unexpected family/protocol byte {family_protocol:#04x}")
    header_length = V2_FIXED_LENGTH + length
    if len(data) < header_length:
        raise ProxyHeaderIncomplete(f"v2: {len(data)} of {header_length} bytes")
    block = data[V2_FIXED_LENGTH:header_length]
    rest = data[header_length:]

    addresses: tuple[Address | None, Address | None, int | None, int | None]
    addresses = (None, None, None, None)
    # spec 2.2: with LOCAL the receiver discards the whole block, family included
    if command == "PROXY" and family != "UNSPEC":
        address_length = _V2_ADDRESS_LENGTHS[family]
        if length < address_length:
            raise ProxyHeaderError(f"v2: length {length} is short of {family}'s {address_length}")
        addresses = _v2_addresses(family, block[:address_length])
        tlvs = _v2_tlvs(block[address_length:])
    else:
        tlvs = ()  # LOCAL, or an UNSPEC block: to be skipped unread
    header = ProxyHeader(
        2,
        command,
        family,
        protocol,
        *addresses,
        header_length=header_length,
        v2_version_command=version_command,
        v2_family_protocol=family_protocol,
        v2_length=length,
        tlvs=tlvs,
    )
    return header, rest


def _v2_addresses(
    family: Family, block: bytes
) -> tuple[Address | None, Address | None, int | None, int | None]:
    if family == "INET":
        return (
            ipaddress.IPv4Address(block[0:4]),
            ipaddress.IPv4Address(block[4:8]),
            int.from_bytes(block[8:10], "big"),
            int.from_bytes(block[10:12], "big"),
        )
    if family == "INET6":
        return (
            ipaddress.IPv6Address(block[0:16]),
            ipaddress.IPv6Address(block[16:32]),
            int.from_bytes(block[32:34], "big"),
            int.from_bytes(block[34:36], "big"),
        )
    return block[0:108], block[108:216], None, None


def _v2_tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    offset = 0
    while offset < len(block):
        if len(block) - offset < 3:
            raise ProxyHeaderError(f"v2: {len(block) - offset} stray bytes after the TLVs")
        kind = block[offset]
        value_length = int.from_bytes(block[offset + 1 : offset + 3], "big")
        value = block[offset + 3 : offset + 3 + value_length]
        if len(value) != value_length:
            raise ProxyHeaderError(f"v2: TLV {kind:#04x} runs past the header's length")
        tlvs.append((kind, value))
        offset += 3 + value_length
    return tuple(tlvs)
