"""Parse the PROXY protocol header a balancer sends first on a connection (--accept-proxy).

This module only reads header bytes (v1 text or v2 binary, HAProxy's proxy-protocol.txt)
into a result; it never touches a socket, logs, or decides whom to trust. Its C twin,
csrc/proxy_header_parse.c, gives the same result for every input (a test compares them).

``parse(data)`` takes the bytes received so far and returns one of:

- `NeedMore`: a valid start of a header; ``at_least`` is a lower bound of the header's
  whole length (exact once a v2 length field has arrived). An error may still come from
  the bytes that arrive before that.
- `ProxyHeader`: ``length`` bytes are the header; any bytes after them are the client's
  data, to be relayed.
- `HeaderError`: the connection must be closed; ``reason`` is one of `PARSE_REASONS`, a
  label for metrics and the access log.

The version is told by the first byte ("P" or CR), and every byte is checked as it
arrives, so one arriving at a time parses as a whole segment does, and a client that
sends no header fails on its first byte that cannot start one.

What is accepted:

- v1: ``PROXY TCP4|TCP6 src dst sport dport\\r\\n`` with canonical addresses and ports
  (no leading zeros; IPv6 in hex groups with at most one "::" standing for one zero
  group or more, no zone), single spaces, at most V1_MAX_LENGTH bytes with the CRLF.
  An IPv6 address may end in a dotted IPv4 tail (``::ffff:192.0.2.1``): the spec says
  hex groups, but HAProxy and nginx write mapped addresses so (inet_ntop(3)), and
  HAProxy's receiver takes them (inet_pton(3)). ``PROXY UNKNOWN`` with
  anything up to the CRLF, which the receiver must ignore.
- v2: version 2, command LOCAL or PROXY, a length field up to V2_MAX_LENGTH - 16 (the
  spec's 536-byte guideline leaves room for TLVs; AWS and HAProxy's TLS TLVs fit).
  LOCAL discards the whole block, family byte included. PROXY takes addresses from TCP
  over IPv4 or IPv6 (0x11, 0x21); the other valid families and protocols (UNSPEC, UNIX,
  datagrams) fall back to the connection's own addresses, as the spec allows. Where the
  address layout is known (family and protocol both specified), the length must hold the
  addresses, and the TLVs after them must tile the rest exactly; their contents are
  skipped unread.

``source is None`` means: use the connection's own endpoints (v1 UNKNOWN, v2 LOCAL, or a
v2 family without usable addresses). Addresses are the text ``inet_ntop(3)`` writes,
so a carried client looks like what ``getpeername()`` would have said.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = [
    "PARSE_REASONS",
    "REASONS",
    "V1_MAX_LENGTH",
    "V2_MAX_LENGTH",
    "HeaderError",
    "NeedMore",
    "ParseResult",
    "ProxyHeader",
    "parse",
]

V1_MAX_LENGTH = 107  # spec 2.1: the longest line, CRLF included
V1_MIN_LENGTH = 15  # "PROXY UNKNOWN\r\n"
V2_FIXED_LENGTH = 16
V2_MAX_LENGTH = 2048  # the whole v2 header we accept: 16 fixed bytes + length <= 2032
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_SIGNATURE = b"PROXY "

# Why a header was refused; PARSE_REASONS in the order of the C table.
BAD_SIGNATURE = "bad-signature"  # neither "PROXY " nor the v2 signature
TOO_LONG = "too-long"  # v1 without CRLF in V1_MAX_LENGTH bytes; v2 over V2_MAX_LENGTH
BAD_V1_SYNTAX = "bad-v1-syntax"  # a lone CR or LF, a missing or doubled space, a field too many
UNKNOWN_FAMILY = "unknown-family"  # v1 other than TCP4/TCP6/UNKNOWN; v2 family nibble > 3
UNKNOWN_PROTOCOL = "unknown-protocol"  # v2 transport protocol nibble > 2
BAD_ADDRESS = "bad-address"  # v1 address or port not canonical or out of range
BAD_VERSION = "bad-version"  # v2 version nibble other than 2
BAD_COMMAND = "bad-command"  # v2 command other than LOCAL or PROXY
BAD_LENGTH = "bad-length"  # v2 length shorter than the family's addresses
BAD_TLV = "bad-tlv"  # v2 TLVs that do not tile the bytes after the addresses
PARSE_REASONS = (
    BAD_SIGNATURE,
    TOO_LONG,
    BAD_V1_SYNTAX,
    UNKNOWN_FAMILY,
    UNKNOWN_PROTOCOL,
    BAD_ADDRESS,
    BAD_VERSION,
    BAD_COMMAND,
    BAD_LENGTH,
    BAD_TLV,
)
# The caller's, never parse()'s: no whole header before EOF, or before --accept-proxy-timeout.
TRUNCATED = "truncated"
TIMEOUT = "timeout"
REASONS = (*PARSE_REASONS, TRUNCATED, TIMEOUT)

Command: TypeAlias = Literal["PROXY", "LOCAL"]


@dataclass(frozen=True, slots=True)
class NeedMore:
    """A valid start of a header: the header is at least ``at_least`` bytes long."""

    at_least: int


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A whole header: ``length`` bytes of the data; the rest is the client's."""

    version: Literal[1, 2]
    command: Command
    family: int  # socket.AF_INET, AF_INET6, AF_UNIX or AF_UNSPEC, as on the wire (LOCAL: UNSPEC)
    source: tuple[str, int] | None  # None: use the connection's own endpoints
    destination: tuple[str, int] | None
    length: int


@dataclass(frozen=True, slots=True)
class HeaderError:
    """Not a valid header; ``reason`` is one of PARSE_REASONS."""

    reason: str


ParseResult: TypeAlias = "NeedMore | ProxyHeader | HeaderError"

_ERRORS = {reason: HeaderError(reason) for reason in REASONS}
_V2_NEED_FIXED = NeedMore(V2_FIXED_LENGTH)
_CR, _LF = 0x0D, 0x0A
_AF_UNSPEC, _AF_INET, _AF_INET6 = int(socket.AF_UNSPEC), int(socket.AF_INET), int(socket.AF_INET6)
_V2_FAMILIES = (_AF_UNSPEC, _AF_INET, _AF_INET6, int(socket.AF_UNIX))
_V2_ADDRESS_LENGTHS = (0, 12, 36, 216)  # by family nibble, with a specified protocol
_V2_TCP4, _V2_TCP6 = 0x11, 0x21
_DIGITS = frozenset(b"0123456789")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_inet_ntop = socket.inet_ntop


def parse(data: bytes | bytearray) -> ParseResult:
    """What the bytes received so far at the start of a connection are (module docstring)."""
    if not data:
        return NeedMore(V1_MIN_LENGTH)
    if data[0] == _CR:
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data: bytes | bytearray) -> ParseResult:
    size = len(data)
    if not _V1_SIGNATURE.startswith(data[:6]):
        return _ERRORS[BAD_SIGNATURE]
    limit = min(size, V1_MAX_LENGTH)
    cr = data.find(b"\r", 6, limit)
    lf = data.find(b"\n", 6, limit)
    if lf >= 0 and (cr < 0 or lf < cr):
        return _ERRORS[BAD_V1_SYNTAX]  # a lone LF
    if 0 <= cr < limit - 1:
        if data[cr + 1] != _LF:
            return _ERRORS[BAD_V1_SYNTAX]  # a lone CR
        return _parse_v1_line(bytes(data[6:cr]), cr + 2)
    # No CRLF yet: it must end by byte V1_MAX_LENGTH.
    if size >= V1_MAX_LENGTH:
        return _ERRORS[TOO_LONG]
    return NeedMore(max(size + 1, V1_MIN_LENGTH))


def _parse_v1_line(line: bytes, length: int) -> ParseResult:
    fields = line.split(b" ")
    protocol = fields[0]
    if protocol == b"UNKNOWN":
        return ProxyHeader(1, "PROXY", _AF_UNSPEC, None, None, length)
    if protocol == b"TCP4":
        family, parse_address = _AF_INET, _ipv4
    elif protocol == b"TCP6":
        family, parse_address = _AF_INET6, _ipv6
    elif protocol:
        return _ERRORS[UNKNOWN_FAMILY]
    else:
        return _ERRORS[BAD_V1_SYNTAX]
    if len(fields) != 5 or not all(fields):
        return _ERRORS[BAD_V1_SYNTAX]
    source = parse_address(fields[1])
    destination = parse_address(fields[2])
    source_port = _port(fields[3])
    destination_port = _port(fields[4])
    if source is None or destination is None or source_port < 0 or destination_port < 0:
        return _ERRORS[BAD_ADDRESS]
    return ProxyHeader(
        1,
        "PROXY",
        family,
        (_inet_ntop(family, source), source_port),
        (_inet_ntop(family, destination), destination_port),
        length,
    )


def _decimal(text: bytes, most: int) -> int:
    """A decimal number of 1 to 3 or 5 digits without a leading zero, or -1."""
    if not 0 < len(text) <= most or not _DIGITS.issuperset(text):
        return -1
    if text[0] == 0x30 and len(text) > 1:
        return -1
    return int(text)


def _port(text: bytes) -> int:
    value = _decimal(text, 5)
    return value if value <= 0xFFFF else -1


def _ipv4(text: bytes) -> bytes | None:
    parts = text.split(b".")
    if len(parts) != 4:
        return None
    octets = [_decimal(part, 3) for part in parts]
    if not all(0 <= octet <= 255 for octet in octets):
        return None
    return bytes(octets)


def _ipv6(text: bytes) -> bytes | None:
    halves = text.split(b"::")
    if len(halves) > 2:
        return None
    groups: list[list[int]] = []
    for half_index, half in enumerate(halves):
        parts = half.split(b":") if half else []
        words = []
        for index, part in enumerate(parts):
            if 0 < len(part) <= 4 and _HEX_DIGITS.issuperset(part):
                words.append(int(part, 16))
            elif half_index == len(halves) - 1 and index == len(parts) - 1:
                quad = _ipv4(part)  # a dotted tail, last only
                if quad is None:
                    return None
                words += (quad[0] << 8 | quad[1], quad[2] << 8 | quad[3])
            else:
                return None
        groups.append(words)
    count = sum(len(words) for words in groups)
    if len(groups) == 1:
        if count != 8:
            return None
        words = groups[0]
    else:
        if count > 7:  # "::" stands for one zero group at least
            return None
        words = groups[0] + [0] * (8 - count) + groups[1]
    return b"".join(word.to_bytes(2, "big") for word in words)


def _parse_v2(data: bytes | bytearray) -> ParseResult:
    size = len(data)
    if not V2_SIGNATURE.startswith(data[:12]):
        return _ERRORS[BAD_SIGNATURE]
    if size <= 12:
        return _V2_NEED_FIXED
    version_command = data[12]
    if version_command >> 4 != 2:
        return _ERRORS[BAD_VERSION]
    command = version_command & 0xF
    if command > 1:
        return _ERRORS[BAD_COMMAND]
    if size <= 13:
        return _V2_NEED_FIXED
    family_protocol = data[13]
    family = family_protocol >> 4
    protocol = family_protocol & 0xF
    if command == 1:
        if family > 3:
            return _ERRORS[UNKNOWN_FAMILY]
        if protocol > 2:
            return _ERRORS[UNKNOWN_PROTOCOL]
    if size < V2_FIXED_LENGTH:
        return _V2_NEED_FIXED
    length = V2_FIXED_LENGTH + (data[14] << 8 | data[15])
    if length > V2_MAX_LENGTH:
        return _ERRORS[TOO_LONG]
    # The address layout is known only for PROXY with both family and protocol given.
    layout_known = command == 1 and family != 0 and protocol != 0
    addresses_end = V2_FIXED_LENGTH + (_V2_ADDRESS_LENGTHS[family] if layout_known else 0)
    if addresses_end > length:
        return _ERRORS[BAD_LENGTH]
    if size < length:
        return NeedMore(length)
    if layout_known:
        offset = addresses_end
        while offset < length:
            if length - offset < 3:
                return _ERRORS[BAD_TLV]
            offset += 3 + (data[offset + 1] << 8 | data[offset + 2])
        if offset != length:
            return _ERRORS[BAD_TLV]
    if command == 0:
        return ProxyHeader(2, "LOCAL", _AF_UNSPEC, None, None, length)
    if family_protocol == _V2_TCP4:
        source = (_inet_ntop(_AF_INET, data[16:20]), data[24] << 8 | data[25])
        destination = (_inet_ntop(_AF_INET, data[20:24]), data[26] << 8 | data[27])
    elif family_protocol == _V2_TCP6:
        source = (_inet_ntop(_AF_INET6, data[16:32]), data[48] << 8 | data[49])
        destination = (_inet_ntop(_AF_INET6, data[32:48]), data[50] << 8 | data[51])
    else:
        return ProxyHeader(2, "PROXY", _V2_FAMILIES[family], None, None, length)
    return ProxyHeader(2, "PROXY", _V2_FAMILIES[family], source, destination, length)
