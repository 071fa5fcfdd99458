"""Address syntax: targets and `--listen` addresses, to frozen values.

Target (systemd-socket-proxyd's syntax): `HOST:PORT`, `HOST` (port 80), `[IPV6]:PORT`,
`/unix/path`, `@abstract`, and `vsock:CID:PORT` (AF_VSOCK, vsock(7)). Listen
(ListenStream= syntax, systemd.socket(5)): `PORT`, `IPV4:PORT`, `[IPV6]:PORT`, `/path`,
`@abstract`, optionally named `NAME=ADDR`. Both take a prefix for sockets that keep
message boundaries: `udp:` before an IP address (ListenDatagram=), `unix-dgram:` and
`seqpacket:` before a unix path (ListenDatagram=, ListenSequentialPacket=); a target's
`udp:HOST:PORT` needs its port.
Metrics (`--metrics`): the same without a bare `PORT` or a name.
Routes (`--route`): `NAME=TARGET`, NAME as in `--listen NAME=ADDR`.
Never resolves host names and never opens sockets; service names ("http") are looked
up in the local services database only.
"""

import ipaddress
import re
import socket
from dataclasses import dataclass

from forkproxy.errors import UsageError
from forkproxy.settings.quoting import digits_value, printable, quote

# sockaddr_un.sun_path is 108 bytes; a file system path needs its terminating NUL,
# an abstract name uses all of it after the leading NUL.
_UNIX_PATH_MAX = 107
_ABSTRACT_NAME_MAX = 107
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$"
)
# FileDescriptorName=: printable, no ':' (it separates names in LISTEN_FDNAMES).
_LISTENER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")

SockAddr = tuple[str, int] | tuple[str, int, int, int] | str | tuple[int, int]

# Prefixes of the kinds that keep message boundaries (socket types, socket(2)).
_UDP_PREFIX = "udp:"
_UNIX_PREFIXES = {"unix-dgram:": socket.SOCK_DGRAM, "seqpacket:": socket.SOCK_SEQPACKET}
_KIND_PREFIXES = (_UDP_PREFIX, *_UNIX_PREFIXES)

# vsock(7): a 32-bit CID and port; the all-ones values are the "any" wildcards, which
# cannot be connected to.
_VSOCK_PREFIX = "vsock:"
_VSOCK_MAX = 0xFFFFFFFE


@dataclass(frozen=True, slots=True)
class TargetAddress:
    """Where connections are relayed to.

    `family` is 0 for a host name that must be resolved at connect time; otherwise
    `sockaddr` is ready for connect(). `text` is what the user typed, for logs and the
    process title: printable, its control characters and undecodable bytes escaped.
    `kind` is the socket type: SOCK_STREAM, or SOCK_DGRAM (`udp:`, `unix-dgram:`) or
    SOCK_SEQPACKET (`seqpacket:`).
    """

    text: str
    family: int
    host: str
    port: int
    sockaddr: SockAddr | None
    kind: int = socket.SOCK_STREAM

    @property
    def needs_resolving(self) -> bool:
        return self.family == 0


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A socket forkproxy binds itself when systemd passed none; `text` as in
    `TargetAddress`."""

    text: str
    name: str
    family: int
    sockaddr: SockAddr
    dual_stack: bool  # bare PORT: IPv6 any-address that also takes IPv4, as systemd does
    kind: int = socket.SOCK_STREAM  # SOCK_DGRAM for udp: and unix-dgram:, ...


def parse_target(text: str) -> TargetAddress:
    """Parse a target as systemd-socket-proxyd accepts it; raise UsageError if invalid."""
    if not text:
        raise UsageError("empty target: give HOST:PORT or a unix socket path")
    _refuse_nul(text, "target")
    if text[0] in "/@":
        path = _unix_sockaddr(text, "target")
        return TargetAddress(printable(text), socket.AF_UNIX, "", 0, path)
    if text.startswith(_VSOCK_PREFIX):
        return _parse_vsock(text)
    for prefix, kind in _UNIX_PREFIXES.items():
        if text.startswith(prefix):
            path = _prefixed_unix_sockaddr(text, prefix, "target")
            return TargetAddress(printable(text), socket.AF_UNIX, "", 0, path, kind)
    if text.startswith(_UDP_PREFIX):
        return _parse_inet_target(text, text[len(_UDP_PREFIX) :], None, socket.SOCK_DGRAM)
    return _parse_inet_target(text, text, "80", socket.SOCK_STREAM)


def _parse_inet_target(text: str, rest: str, default_port: str | None, kind: int) -> TargetAddress:
    """HOST:PORT, [IPV6]:PORT or HOST (with a default port) of a TCP or UDP target."""
    if not rest or rest[0] in "/@":
        raise UsageError(
            f"invalid target {quote(text)}: expected udp:HOST:PORT "
            "(unix-dgram:PATH for a unix datagram socket)"
        )
    host, port_text = _split_host_port(rest, "target", default_port, text)
    port = _parse_port(port_text, text, "target", "tcp" if kind == socket.SOCK_STREAM else "udp")
    if host.startswith("["):
        address = _parse_ipv6_literal(host, text, "target")
        return TargetAddress(text, socket.AF_INET6, address, port, (address, port, 0, 0), kind)
    if _is_ipv4(host):
        return TargetAddress(text, socket.AF_INET, host, port, (host, port), kind)
    if not _HOSTNAME.fullmatch(host):
        raise UsageError(
            f"invalid target {quote(text)}: {quote(host)} is not a host name or address"
        )
    if host.isdigit():  # e.g. "-p 2" meant as "-p v2"; no real host name is a bare number
        raise UsageError(f"invalid target {quote(text)}: a host name cannot be a bare number")
    return TargetAddress(text, 0, host, port, None, kind)


def parse_route(text: str) -> tuple[str, TargetAddress]:
    """Parse a --route value, NAME=TARGET: connections from listener NAME go to TARGET."""
    name, equals, target = text.partition("=")
    if not equals:
        raise UsageError(f"invalid route {quote(text)}: expected NAME=TARGET")
    if not _LISTENER_NAME.fullmatch(name):
        raise UsageError(
            f"invalid route {quote(text)}: name {quote(name)} may only contain "
            "letters, digits, '_', '.' and '-'"
        )
    return name, parse_target(target)


def is_listener_name(name: str) -> bool:
    """Whether `name` can name a listener (FileDescriptorName=, --listen NAME=ADDR)."""
    return bool(_LISTENER_NAME.match(name))


def _parse_vsock(text: str) -> TargetAddress:
    cid_text, colon, port_text = text[len(_VSOCK_PREFIX) :].partition(":")
    if not colon:
        raise UsageError(f"invalid target {quote(text)}: expected vsock:CID:PORT")
    values = []
    for what, number in (("CID", cid_text), ("port", port_text)):
        if not number:
            raise UsageError(f"invalid target {quote(text)}: missing {what} (vsock:CID:PORT)")
        if not (number.isascii() and number.isdigit()):
            raise UsageError(
                f"invalid target {quote(text)}: {what} {quote(number)} is not a number"
            )
        value = digits_value(number, len(str(_VSOCK_MAX)))
        if value is None or value > _VSOCK_MAX:
            raise UsageError(
                f"invalid target {quote(text)}: {what} {quote(number)} is not in 0-{_VSOCK_MAX}"
            )
        values.append(value)
    cid, port = values
    return TargetAddress(text, socket.AF_VSOCK, cid_text, port, (cid, port))


def parse_listen(text: str) -> ListenAddress:
    """Parse a --listen value (ListenStream= syntax, optionally NAME=ADDR; `udp:ADDR`,
    `unix-dgram:PATH` and `seqpacket:PATH` for the other socket types)."""
    _refuse_nul(text, "listen address")
    name, address = _split_name(text)
    if not address:
        raise UsageError(f"invalid listen address {quote(text)}: empty address")
    kind = socket.SOCK_STREAM
    for prefix, unix_kind in _UNIX_PREFIXES.items():
        if address.startswith(prefix):
            path = _prefixed_unix_sockaddr(address, prefix, "listen address", text)
            return ListenAddress(printable(text), name, socket.AF_UNIX, path, False, unix_kind)
    if address.startswith(_UDP_PREFIX):
        kind = socket.SOCK_DGRAM
        address = address[len(_UDP_PREFIX) :]
        if not address or address[0] in "/@":
            raise UsageError(
                f"invalid listen address {quote(text)}: expected udp:PORT, udp:IPV4:PORT or "
                "udp:[IPV6]:PORT (unix-dgram:PATH for a unix datagram socket)"
            )
    elif address[0] in "/@":
        return ListenAddress(
            printable(text), name, socket.AF_UNIX, _unix_sockaddr(address, "listen address"), False
        )
    protocol = "tcp" if kind == socket.SOCK_STREAM else "udp"
    if address.isdigit():
        port = _parse_port(address, text, "listen address", protocol)
        return ListenAddress(text, name, socket.AF_INET6, ("::", port, 0, 0), True, kind)

    host, port_text = _split_host_port(address, "listen address", None, text)
    port = _parse_port(port_text, text, "listen address", protocol)
    if host.startswith("["):
        ipv6 = _parse_ipv6_literal(host, text, "listen address")
        return ListenAddress(text, name, socket.AF_INET6, (ipv6, port, 0, 0), False, kind)
    if _is_ipv4(host):
        return ListenAddress(text, name, socket.AF_INET, (host, port), False, kind)
    raise UsageError(
        f"invalid listen address {quote(text)}: {quote(host)} is not an IP address "
        "(write PORT, IPV4:PORT, [IPV6]:PORT, /path or @name)"
    )


def parse_metrics(text: str) -> ListenAddress:
    """Parse a --metrics value: IPV4:PORT, [IPV6]:PORT, /path or @name.

    Unlike --listen, no bare PORT (it would listen on every interface) and no NAME=.
    """
    _refuse_nul(text, "metrics address")
    if not text:
        raise UsageError("invalid metrics address '': empty address")
    if text[0] in "/@":
        path = _unix_sockaddr(text, "metrics address")
        return ListenAddress(printable(text), "metrics", socket.AF_UNIX, path, False)
    if text.isascii() and text.isdigit():
        raise UsageError(
            f"invalid metrics address {quote(text)}: give the address to listen on too, "
            "as in 127.0.0.1:9100 (a bare port would listen on every interface)"
        )
    host, port_text = _split_host_port(text, "metrics address", default_port=None)
    port = _parse_port(port_text, text, "metrics address")
    if host.startswith("["):
        ipv6 = _parse_ipv6_literal(host, text, "metrics address")
        return ListenAddress(text, "metrics", socket.AF_INET6, (ipv6, port, 0, 0), False)
    if _is_ipv4(host):
        return ListenAddress(text, "metrics", socket.AF_INET, (host, port), False)
    raise UsageError(
        f"invalid metrics address {quote(text)}: {quote(host)} is not an IP address "
        "(write IPV4:PORT, [IPV6]:PORT, /path or @name)"
    )


def format_sockaddr(family: int, sockaddr: object) -> str:
    """A peer or local address as an operator reads it: 1.2.3.4:80, [::1]:80, /path, @name."""
    if family == socket.AF_INET and isinstance(sockaddr, tuple):
        return f"{sockaddr[0]}:{sockaddr[1]}"
    if family == socket.AF_INET6 and isinstance(sockaddr, tuple):
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    if family == socket.AF_VSOCK and isinstance(sockaddr, tuple):
        return f"vsock:{sockaddr[0]}:{sockaddr[1]}"
    if isinstance(sockaddr, bytes):
        sockaddr = sockaddr.decode("utf-8", "backslashreplace")
    if isinstance(sockaddr, str):
        if sockaddr.startswith("\0"):
            return "@" + printable(sockaddr[1:])
        return printable(sockaddr) or "unix-client"
    return str(sockaddr)


def _refuse_nul(text: str, what: str) -> None:
    if "\0" in text:
        raise UsageError(f"invalid {what} {quote(text)}: contains a NUL character")


def _split_name(text: str) -> tuple[str, str]:
    if text[:1] in ("/", "@", "[") or "=" not in text or text.startswith(_KIND_PREFIXES):
        return "", text
    name, address = text.split("=", 1)
    if not _LISTENER_NAME.fullmatch(name):
        raise UsageError(
            f"invalid listen address {quote(text)}: name {quote(name)} may only contain "
            "letters, digits, '_', '.' and '-'"
        )
    return name, address


def _split_host_port(
    text: str, what: str, default_port: str | None, whole: str | None = None
) -> tuple[str, str]:
    """HOST and PORT of `text`; errors quote `whole`, the value `text` is part of."""
    shown = quote(text if whole is None else whole)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"invalid {what} {shown}: missing ']' after the IPv6 address")
        host, rest = text[: end + 1], text[end + 1 :]
        if not rest:
            if default_port is None:
                raise UsageError(f"invalid {what} {shown}: missing ':PORT'")
            return host, default_port
        if not rest.startswith(":"):
            raise UsageError(f"invalid {what} {shown}: expected ':PORT' after ']'")
        return host, rest[1:]
    if text.count(":") > 1:
        raise UsageError(
            f"invalid {what} {shown}: write IPv6 addresses in brackets, as in '[::1]:80'"
        )
    if ":" not in text:
        if default_port is None:
            raise UsageError(f"invalid {what} {shown}: missing ':PORT'")
        return text, default_port
    host, port = text.split(":")
    if not host:
        raise UsageError(f"invalid {what} {shown}: missing host before ':'")
    return host, port


def _parse_port(port_text: str, text: str, what: str, protocol: str = "tcp") -> int:
    if port_text.isdigit() and port_text.isascii():
        port = digits_value(port_text, 5)
        if port is not None and 1 <= port <= 65535:
            return port
        shown = port_text if len(port_text) <= 20 else quote(port_text)  # ASCII digits
        raise UsageError(f"invalid {what} {quote(text)}: port {shown} is not in 1-65535")
    if not port_text:
        raise UsageError(f"invalid {what} {quote(text)}: missing port after ':'")
    try:
        return socket.getservbyname(port_text, protocol)
    except (OSError, UnicodeError):
        raise UsageError(
            f"invalid {what} {quote(text)}: {quote(port_text)} is neither a port number "
            "nor a known service"
        ) from None


def _parse_ipv6_literal(bracketed: str, text: str, what: str) -> str:
    literal = bracketed[1:-1]
    address, _, scope = literal.partition("%")
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        raise UsageError(
            f"invalid {what} {quote(text)}: {quote(literal)} is not an IPv6 address"
        ) from None
    if "%" in literal and not scope:
        raise UsageError(f"invalid {what} {quote(text)}: empty scope after '%'")
    if not (scope.isascii() and scope.isprintable()) or " " in scope:
        raise UsageError(f"invalid {what} {quote(text)}: {quote(scope)} is not an interface")
    return literal


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _prefixed_unix_sockaddr(text: str, prefix: str, what: str, whole: str | None = None) -> str:
    """The sockaddr of `unix-dgram:PATH` or `seqpacket:PATH`; errors quote `whole`."""
    path = text[len(prefix) :]
    if not path or path[0] not in "/@":
        raise UsageError(
            f"invalid {what} {quote(text if whole is None else whole)}: expected "
            f"{prefix}/path or {prefix}@name"
        )
    return _unix_sockaddr(path, what, whole if whole is not None else text)


def _unix_sockaddr(text: str, what: str, whole: str | None = None) -> str:
    """The sockaddr of /path or @name; errors quote `whole`, the value `text` is part of."""
    shown = quote(text if whole is None else whole)
    encoded = text.encode("utf-8", "surrogateescape")
    if text[0] == "@":
        if len(encoded) - 1 > _ABSTRACT_NAME_MAX:
            raise UsageError(
                f"invalid {what} {shown}: abstract socket names are at most "
                f"{_ABSTRACT_NAME_MAX} bytes"
            )
        if len(encoded) == 1:
            raise UsageError(f"invalid {what} {shown}: empty abstract socket name")
        return "\0" + text[1:]
    if len(encoded) > _UNIX_PATH_MAX:
        raise UsageError(
            f"invalid {what} {shown}: unix socket paths are at most {_UNIX_PATH_MAX} bytes"
        )
    return text
