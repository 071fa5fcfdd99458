"""Encode the HAProxy PROXY protocol header that opens each target connection.

This module only turns a client connection's two endpoints into header bytes (v1 text or
v2 binary, as in HAProxy's proxy-protocol.txt); it never touches a socket, logs, or reads
a header. It runs once per relayed connection, so the constant parts are built at import.

Inputs are what the accepted client socket reports: ``client`` from ``getpeername()``,
``local`` from ``getsockname()`` (the address the client reached, which for a wildcard
listener is the concrete one), and ``family`` from ``socket.family``. The family is taken
rather than guessed from the address's shape because an ``AF_VSOCK`` peer is a 2-tuple too.

What is sent, by client family:

=================  =========================================  ======================
client             v1                                         v2
=================  =========================================  ======================
AF_INET            ``PROXY TCP4 src dst sport dport\\r\\n``     PROXY, TCP4 (0x11)
AF_INET6           ``PROXY TCP6 ...``                         PROXY, TCP6 (0x21)
AF_INET6, mapped   as AF_INET with the plain IPv4 addresses   as AF_INET
anything else      ``PROXY UNKNOWN\\r\\n``                      LOCAL, UNSPEC, len 0
=================  =========================================  ======================

- "Mapped" means both ends are IPv4-mapped (``::ffff:a.b.c.d``), which is what a
  dual-stack ``[::]`` listener reports for an IPv4 client; receivers then see the real
  IPv4 client as HAProxy and nginx users expect. A lone mapped end stays TCP6.
- A unix-socket (or vsock) client has no address a receiver could use: v2 says LOCAL
  (the receiver uses the real connection's endpoints), v1 says UNKNOWN in its short form,
  which the spec keeps for exactly this ("not possible to correctly fill the PROXY line")
  and which receivers should accept the same way (nginx does).
- IPv6 scope ids (``fe80::1%eth0``) are dropped: neither version can carry them. v1 IPv6
  text is RFC 5952 form in hex groups only (never a dotted IPv4 tail), at most 104 bytes.
- No TLVs are sent.

The caller must send the header with one ``send()``, first on the target connection:
nginx (1.22) parses it from its first read and resets the connection as a "broken
header" when it arrives in two segments.

Invalid addresses or ports raise ``ValueError``: inputs come from the kernel, so that is a
bug in the caller, not a user's mistake.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

__all__ = [
    "V2_SIGNATURE",
    "HeaderEncoder",
    "SocketAddress",
    "encode_v1",
    "encode_v2",
    "header_encoder",
]

SocketAddress: TypeAlias = Any
"""What ``getpeername()``/``getsockname()`` return (typeshed says ``Any`` too): ``(host,
port)`` for AF_INET, ``(host, port, flowinfo, scope_id)`` for AF_INET6, ``str`` or
``bytes`` for AF_UNIX."""

HeaderEncoder: TypeAlias = Callable[[SocketAddress, SocketAddress, int], bytes]
"""``encode(client, local, family) -> header``: `encode_v1` or `encode_v2`."""

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"

_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"

# version 2 in the high nibble; command PROXY (1) or LOCAL (0) in the low one
_V2_PROXY = 0x21
_V2_LOCAL = 0x20
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_LOCAL_HEADER = V2_SIGNATURE + bytes((_V2_LOCAL, 0x00)) + struct.pack("!H", 0)
# signature, ver/cmd, family/protocol, length, then src addr, dst addr, src port, dst port
_V2_TCP4_HEADER = struct.Struct("!16s4s4sHH")
_V2_TCP6_HEADER = struct.Struct("!16s16s16sHH")
_V2_TCP4_PREFIX = V2_SIGNATURE + bytes((_V2_PROXY, _V2_TCP4)) + struct.pack("!H", 12)
_V2_TCP6_PREFIX = V2_SIGNATURE + bytes((_V2_PROXY, _V2_TCP6)) + struct.pack("!H", 36)
_IPV6_GROUPS = struct.Struct("!8H")


def encode_v1(client: SocketAddress, local: SocketAddress, family: int) -> bytes:
    """The v1 text header for a connection from ``client`` to ``local``."""
    if family == _AF_INET:
        client_ip = client[0]
        local_ip = local[0]
        # inet_pton(3) takes only dotted decimal without leading zeros, which is v1's
        # form, so a string it accepts goes out as it is.
        _pack_ipv4(client_ip)
        _pack_ipv4(local_ip)
        proto = "TCP4"
    elif family == _AF_INET6:
        client_packed = _pack_ipv6(client[0])
        local_packed = _pack_ipv6(local[0])
        if client_packed[:12] == _MAPPED_PREFIX and local_packed[:12] == _MAPPED_PREFIX:
            client_ip = socket.inet_ntop(_AF_INET, client_packed[12:])
            local_ip = socket.inet_ntop(_AF_INET, local_packed[12:])
            proto = "TCP4"
        else:
            client_ip = _ipv6_text(client_packed)
            local_ip = _ipv6_text(local_packed)
            proto = "TCP6"
    else:
        return _V1_UNKNOWN
    client_port = client[1]
    local_port = local[1]
    if not (0 <= client_port <= 0xFFFF and 0 <= local_port <= 0xFFFF):
        raise ValueError(f"port out of range in {client!r} or {local!r}")
    return f"PROXY {proto} {client_ip} {local_ip} {client_port} {local_port}\r\n".encode()


def encode_v2(client: SocketAddress, local: SocketAddress, family: int) -> bytes:
    """The v2 binary header for a connection from ``client`` to ``local``."""
    if family == _AF_INET:
        layout = _V2_TCP4_HEADER
        prefix = _V2_TCP4_PREFIX
        client_packed = _pack_ipv4(client[0])
        local_packed = _pack_ipv4(local[0])
    elif family == _AF_INET6:
        client_packed = _pack_ipv6(client[0])
        local_packed = _pack_ipv6(local[0])
        if client_packed[:12] == _MAPPED_PREFIX and local_packed[:12] == _MAPPED_PREFIX:
            layout = _V2_TCP4_HEADER
            prefix = _V2_TCP4_PREFIX
            client_packed = client_packed[12:]
            local_packed = local_packed[12:]
        else:
            layout = _V2_TCP6_HEADER
            prefix = _V2_TCP6_PREFIX
    else:
        return _V2_LOCAL_HEADER
    try:
        return layout.pack(prefix, client_packed, local_packed, client[1], local[1])
    except struct.error as exc:
        raise ValueError(f"invalid port in {client!r} or {local!r}: {exc}") from None


def header_encoder(version: Literal[1, 2]) -> HeaderEncoder:
    """The encoder for PROXY protocol ``version`` 1 or 2, to bind once per worker."""
    if version == 1:
        return encode_v1
    if version == 2:
        return encode_v2
    raise ValueError(f"unknown PROXY protocol version {version!r}")


def _pack_ipv4(host: str) -> bytes:
    try:
        return socket.inet_pton(_AF_INET, host)
    except (OSError, TypeError):
        raise ValueError(f"invalid IPv4 address {host!r}") from None


def _pack_ipv6(host: str) -> bytes:
    try:
        return socket.inet_pton(_AF_INET6, host)
    except (OSError, TypeError):
        pass
    # getpeername() appends "%scope" to link-local addresses; no header can carry it.
    try:
        address, percent, _scope = host.partition("%")
        if percent:
            return socket.inet_pton(_AF_INET6, address)
    except (OSError, TypeError):
        pass
    raise ValueError(f"invalid IPv6 address {host!r}")


def _ipv6_text(packed: bytes) -> str:
    text = socket.inet_ntop(_AF_INET6, packed)
    if "." not in text:
        return text
    # inet_ntop(3) writes ::a.b.c.d and ::ffff:a.b.c.d with a dotted tail, which v1's
    # "sets of hexadecimal digits" does not allow: spell those out in RFC 5952 form.
    groups = _IPV6_GROUPS.unpack(packed)
    best_start, best_len, run_start = -1, 1, -1
    for index, group in enumerate((*groups, 1)):
        if group == 0:
            if run_start < 0:
                run_start = index
        elif run_start >= 0:
            if index - run_start > best_len:
                best_start, best_len = run_start, index - run_start
            run_start = -1
    hexes = [f"{group:x}" for group in groups]
    if best_start < 0:
        return ":".join(hexes)
    head = ":".join(hexes[:best_start])
    tail = ":".join(hexes[best_start + best_len :])
    return f"{head}::{tail}"
