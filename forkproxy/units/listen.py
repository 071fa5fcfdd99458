"""What the generated socket units listen on: address syntax, ListenStream= text, clashes.

`--listen-stream` and `--listen-datagram` take systemd.socket(5)'s IP forms: PORT,
IPV4:PORT, [IPV6]:PORT, and a scoped IPv6 address as forkproxy writes it,
[IPV6%DEV]:PORT, or as systemd does, [IPV6]:PORT%DEV. `--listen-unix`,
`--listen-unix-datagram` and `--listen-sequential-packet` take a /path or an @name
(`listen_stream` is the text of any of ListenStream=, ListenDatagram= and
ListenSequentialPacket=, which take the same forms); `--metrics` either kind, but
no bare PORT (forkproxy's rule: it would serve metrics on every interface). Two addresses
the kernel would not let both listen (the same one, or a wildcard and an address on its
port) are refused here, not left to a socket unit that fails to start. Never renders a
unit and never opens a socket.
"""

import ipaddress
import re
from dataclasses import dataclass

from forkproxy.errors import ForkproxyError

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
# ifname_valid() in systemd's network-util.c: printable ASCII but ':', '/', '%' and space,
# shorter than IFNAMSIZ; or an interface number.
_SCOPE = re.compile(r"[!-$&-.0-9;-~]{1,15}")
SUN_PATH_MAX = 107  # sockaddr_un.sun_path less its NUL (or an abstract name's leading NUL)
_ANY_IPV4 = ipaddress.IPv4Address("0.0.0.0")
_ANY_IPV6 = ipaddress.IPv6Address("::")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Listen:
    """One address a socket unit listens on, checked."""

    text: str  # as given
    ip: IPAddress | None = None  # None for a unix socket
    port: int = 0
    scope: str = ""  # interface name or number of a scoped IPv6 address
    bare: bool = False  # PORT alone: every address, IPv6 and IPv4

    @property
    def listen_stream(self) -> str:
        """The ListenStream= value, before '%' is doubled for specifiers."""
        if self.ip is None:
            return self.text
        if self.bare:
            return str(self.port)
        if self.ip.version == 4:
            return f"{self.ip}:{self.port}"
        return f"[{self.ip}]:{self.port}" + (f"%{self.scope}" if self.scope else "")

    def clashes_with(self, other: "Listen") -> str | None:
        """Why both cannot listen at once (Linux, net.ipv6.bindv6only=0), or None."""
        if self.ip is None or other.ip is None:
            same = self.ip is None and other.ip is None and self.text == other.text
            return "is the same socket as" if same else None
        if self.port != other.port:
            return None
        mine, theirs = _comparable(self.ip), _comparable(other.ip)
        if (mine, self.scope) == (theirs, other.scope):
            return "is the same address as"
        for wide, narrow in ((mine, theirs), (theirs, mine)):
            if wide == _ANY_IPV6 or (wide == _ANY_IPV4 and narrow.version == 4):
                return "overlaps"  # a wildcard listener takes its port on every address
        return None


def parse_inet(address: str, flag: str) -> Listen:
    """PORT, IPV4:PORT, [IPV6]:PORT, [IPV6%DEV]:PORT or [IPV6]:PORT%DEV."""
    if address[:1] in ("/", "@"):
        unix_flag = "--listen-unix-datagram" if flag == "--listen-datagram" else "--listen-unix"
        raise ForkproxyError(f"invalid {flag} '{address}': use {unix_flag} for unix sockets")
    scope = ""
    bare = False
    ip: IPAddress
    if address.startswith("["):
        literal, bracket, port = address[1:].partition("]:")
        if not bracket:
            raise ForkproxyError(
                f"invalid {flag} '{address}': expected [IPV6]:PORT, as in '[::1]:8080'"
            )
        if "%" in port:  # systemd's own spelling of the scope
            port, _, scope = port.partition("%")
            if "%" in literal:
                raise ForkproxyError(f"invalid {flag} '{address}': give the scope once")
            _check_scope(scope, address, flag)
        elif "%" in literal:
            literal, _, scope = literal.partition("%")
            _check_scope(scope, address, flag)
        parsed = _ip(literal)
        if parsed is None or parsed.version != 6:
            raise ForkproxyError(
                f"invalid {flag} '{address}': expected [IPV6]:PORT, as in '[::1]:8080'"
            )
        ip = parsed
    elif ":" in address:
        host, _, port = address.rpartition(":")
        parsed = _ip(host)
        if parsed is None or parsed.version != 4:
            raise ForkproxyError(
                f"invalid {flag} '{address}': '{host}' is not an IPv4 address "
                "(write PORT, IPV4:PORT or [IPV6]:PORT)"
            )
        ip = parsed
    else:
        port, ip, bare = address, _ANY_IPV6, True
    if not (_PORT.fullmatch(port) and int(port) <= 65535):
        raise ForkproxyError(
            f"invalid {flag} '{address}': port '{port}' is not a number in 1-65535"
        )
    return Listen(address, ip, int(port), scope, bare)


def parse_unix(path: str, flag: str) -> Listen:
    """/path or @name, as ListenStream= takes them."""
    if not path.startswith(("/", "@")):
        raise ForkproxyError(f"invalid {flag} '{path}': give an absolute /path or an @name")
    if CONTROL.search(path) or path != path.strip() or path.endswith("\\"):
        raise ForkproxyError(
            f"invalid {flag} {path!r}: no control characters, edge spaces or final '\\'"
        )
    if path in ("/", "@"):
        raise ForkproxyError(f"invalid {flag} '{path}': no socket name after '{path}'")
    if len(path.encode()) - (1 if path.startswith("@") else 0) > SUN_PATH_MAX:
        raise ForkproxyError(f"invalid {flag} '{path}': longer than {SUN_PATH_MAX} bytes")
    return Listen(path)


def parse_metrics(address: str) -> Listen:
    """Where metrics are served: as --listen-stream or --listen-unix, but no bare PORT."""
    if address[:1] in ("/", "@"):
        return parse_unix(address, "--metrics")
    if address.isascii() and address.isdigit():
        raise ForkproxyError(
            f"invalid --metrics '{address}': give the address to listen on too, as in "
            f"127.0.0.1:{address} (a bare port would listen on every interface)"
        )
    return parse_inet(address, "--metrics")


def parse_listen(address: str) -> Listen:
    """An address already checked by one of the parsers above, parsed again."""
    if address[:1] in ("/", "@"):
        return parse_unix(address, "--listen-unix")
    return parse_inet(address, "--listen-stream")


def check_distinct(addresses: list[tuple[str, str]]) -> None:
    """(flag, address) pairs, in the order given: refuse the first that clashes."""
    seen: list[tuple[str, Listen]] = []
    for flag, text in addresses:
        listen = parse_listen(text)
        for earlier_flag, earlier in seen:
            relation = listen.clashes_with(earlier)
            if relation is None:
                continue
            if (flag, text) == (earlier_flag, earlier.text):
                raise ForkproxyError(f"{flag} '{text}' is given twice")
            what = f"{flag} '{text}' {relation} {earlier_flag} '{earlier.text}'"
            if relation == "overlaps":
                what += f": a wildcard address listens on every address at port {listen.port}"
            raise ForkproxyError(what)
        seen.append((flag, listen))


def _comparable(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address is its IPv4 address, as the kernel binds it."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _check_scope(scope: str, address: str, flag: str) -> None:
    if not _SCOPE.fullmatch(scope) or scope in (".", ".."):
        raise ForkproxyError(
            f"invalid {flag} '{address}': '%{scope}' is not an interface name or number "
            "(at most 15 characters, none of ':', '/', '%', space)"
        )


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
