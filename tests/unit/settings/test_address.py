"""Target and --listen syntax, with the exact error an operator reads."""

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkproxy.errors import UsageError
from forkproxy.settings.address import format_sockaddr, parse_listen, parse_metrics, parse_target
from forkproxy.settings.quoting import printable


@pytest.mark.parametrize(
    ("text", "family", "host", "port", "sockaddr"),
    [
        ("127.0.0.1:8080", socket.AF_INET, "127.0.0.1", 8080, ("127.0.0.1", 8080)),
        ("127.0.0.1", socket.AF_INET, "127.0.0.1", 80, ("127.0.0.1", 80)),
        ("[::1]:443", socket.AF_INET6, "::1", 443, ("::1", 443, 0, 0)),
        ("[::1]", socket.AF_INET6, "::1", 80, ("::1", 80, 0, 0)),
        ("[fe80::1%lo]:80", socket.AF_INET6, "fe80::1%lo", 80, ("fe80::1%lo", 80, 0, 0)),
        ("localhost:8080", 0, "localhost", 8080, None),
        ("backend.example:http", 0, "backend.example", 80, None),
        ("nginx", 0, "nginx", 80, None),
        ("/run/nginx/socket", socket.AF_UNIX, "", 0, "/run/nginx/socket"),
        ("@nginx", socket.AF_UNIX, "", 0, "\0nginx"),
    ],
)
def test_target(text: str, family: int, host: str, port: int, sockaddr: object) -> None:
    address = parse_target(text)
    assert (address.family, address.host, address.port, address.sockaddr) == (
        family,
        host,
        port,
        sockaddr,
    )
    assert address.needs_resolving == (family == 0)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "empty target: give HOST:PORT or a unix socket path"),
        ("::1", "invalid target '::1': write IPv6 addresses in brackets, as in '[::1]:80'"),
        ("[::1", "invalid target '[::1': missing ']' after the IPv6 address"),
        ("[::1]80", "invalid target '[::1]80': expected ':PORT' after ']'"),
        ("[nope]:80", "invalid target '[nope]:80': 'nope' is not an IPv6 address"),
        (":80", "invalid target ':80': missing host before ':'"),
        ("host:", "invalid target 'host:': missing port after ':'"),
        ("host:0", "invalid target 'host:0': port 0 is not in 1-65535"),
        ("host:65536", "invalid target 'host:65536': port 65536 is not in 1-65535"),
        (
            "host:nope",
            "invalid target 'host:nope': 'nope' is neither a port number nor a known service",
        ),
        (
            "bad_host!:80",
            "invalid target 'bad_host!:80': 'bad_host!' is not a host name or address",
        ),
        (
            "/" + "a" * 107,
            "invalid target '/" + "a" * 107 + "': unix socket paths are at most 107 bytes",
        ),
        ("@", "invalid target '@': empty abstract socket name"),
        ("2", "invalid target '2': a host name cannot be a bare number"),
    ],
)
def test_target_errors(text: str, error: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_target(text)
    assert str(raised.value) == error


@pytest.mark.parametrize(
    ("text", "name", "family", "sockaddr", "dual_stack"),
    [
        ("8080", "", socket.AF_INET6, ("::", 8080, 0, 0), True),
        ("127.0.0.1:8080", "", socket.AF_INET, ("127.0.0.1", 8080), False),
        ("[::1]:8080", "", socket.AF_INET6, ("::1", 8080, 0, 0), False),
        ("/run/proxy.sock", "", socket.AF_UNIX, "/run/proxy.sock", False),
        ("@proxy", "", socket.AF_UNIX, "\0proxy", False),
        ("web=127.0.0.1:80", "web", socket.AF_INET, ("127.0.0.1", 80), False),
        ("api=/run/api.sock", "api", socket.AF_UNIX, "/run/api.sock", False),
        ("/tmp/a=b.sock", "", socket.AF_UNIX, "/tmp/a=b.sock", False),
    ],
)
def test_listen(text: str, name: str, family: int, sockaddr: object, dual_stack: bool) -> None:
    address = parse_listen(text)
    assert (address.name, address.family, address.sockaddr, address.dual_stack) == (
        name,
        family,
        sockaddr,
        dual_stack,
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("localhost:80", "'localhost' is not an IP address"),
        ("127.0.0.1", "missing ':PORT'"),
        ("0", "port 0 is not in 1-65535"),
        ("bad name=80", "name 'bad name' may only contain"),
        ("web=", "empty address"),
    ],
)
def test_listen_errors(text: str, error: str) -> None:
    with pytest.raises(UsageError, match=error):
        parse_listen(text)


def test_format_sockaddr() -> None:
    assert format_sockaddr(socket.AF_INET, ("1.2.3.4", 5)) == "1.2.3.4:5"
    assert format_sockaddr(socket.AF_INET6, ("::1", 5, 0, 0)) == "[::1]:5"
    assert format_sockaddr(socket.AF_UNIX, "/p") == "/p"
    assert format_sockaddr(socket.AF_UNIX, "\0abs") == "@abs"
    assert format_sockaddr(socket.AF_UNIX, "") == "unix-client"


@given(st.text(max_size=60))
def test_any_target_parses_or_raises_usage_error(text: str) -> None:
    try:
        parse_target(text)
    except UsageError:
        pass


@given(st.text(max_size=60))
def test_any_listen_address_parses_or_raises_usage_error(text: str) -> None:
    try:
        parse_listen(text)
    except UsageError:
        pass


# -- round trips -------------------------------------------------------------------------

ports = st.integers(min_value=1, max_value=65535)
ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6)
# What sun_path takes: at most 107 bytes and no NUL (the kernel's limit, with its NUL).
path_names = st.text(st.characters(codec="utf-8", blacklist_characters="\0"), min_size=1).filter(
    lambda name: len(name.encode()) <= 106
)


@given(ipv4s, ports)
def test_ipv4_round_trips_through_every_parser(host: str, port: int) -> None:
    text = f"{host}:{port}"
    for parse in (parse_target, parse_listen, parse_metrics):
        address = parse(text)
        assert (address.family, address.sockaddr) == (socket.AF_INET, (host, port))
        assert format_sockaddr(address.family, address.sockaddr) == text


@given(ipv6s, ports)
def test_ipv6_round_trips_through_every_parser(host: ipaddress.IPv6Address, port: int) -> None:
    text = f"[{host}]:{port}"
    for parse in (parse_target, parse_listen, parse_metrics):
        address = parse(text)
        assert address.family == socket.AF_INET6
        assert isinstance(address.sockaddr, tuple)
        assert ipaddress.IPv6Address(address.sockaddr[0]) == host
        assert address.sockaddr[1:] == (port, 0, 0)
        assert format_sockaddr(address.family, address.sockaddr) == text


@given(path_names)
def test_unix_paths_round_trip(name: str) -> None:
    for text, sockaddr in ((f"/{name}", f"/{name}"), (f"@{name}", f"\0{name}")):
        if len(text.encode()) > 107:
            continue
        for parse in (parse_target, parse_listen, parse_metrics):
            if parse is parse_listen and "=" in text:
                continue  # NAME=ADDR: tested below
            address = parse(text)
            assert (address.family, address.sockaddr) == (socket.AF_UNIX, sockaddr)
            # Shown as typed, control characters escaped (one line in a log).
            assert format_sockaddr(address.family, address.sockaddr) == printable(text)
            assert address.text == printable(text)


@given(st.from_regex(r"\A[A-Za-z0-9_.-]{1,30}\Z"), ipv4s, ports)
def test_named_listen_addresses_keep_their_name(name: str, host: str, port: int) -> None:
    address = parse_listen(f"{name}={host}:{port}")
    assert (address.name, address.sockaddr) == (name, (host, port))


@given(st.text(max_size=60))
def test_any_metrics_address_parses_or_raises_usage_error(text: str) -> None:
    try:
        address = parse_metrics(text)
    except UsageError as error:
        assert "\n" not in str(error).replace(text, "")
        return
    assert not text.isdigit()  # never a bare port: that would listen on every interface
    assert address.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


# -- socket kinds: udp:, unix-dgram:, seqpacket: -------------------------------------------

DGRAM, SEQPACKET, STREAM = socket.SOCK_DGRAM, socket.SOCK_SEQPACKET, socket.SOCK_STREAM


@pytest.mark.parametrize(
    ("text", "family", "host", "port", "sockaddr", "kind"),
    [
        ("udp:127.0.0.1:53", socket.AF_INET, "127.0.0.1", 53, ("127.0.0.1", 53), DGRAM),
        ("udp:[::1]:53", socket.AF_INET6, "::1", 53, ("::1", 53, 0, 0), DGRAM),
        ("udp:dns.example:domain", 0, "dns.example", 53, None, DGRAM),
        ("udp:statsd:8125", 0, "statsd", 8125, None, DGRAM),
        ("unix-dgram:/run/log.sock", socket.AF_UNIX, "", 0, "/run/log.sock", DGRAM),
        ("unix-dgram:@log", socket.AF_UNIX, "", 0, "\0log", DGRAM),
        ("seqpacket:/run/sp.sock", socket.AF_UNIX, "", 0, "/run/sp.sock", SEQPACKET),
        ("seqpacket:@sp", socket.AF_UNIX, "", 0, "\0sp", SEQPACKET),
        ("127.0.0.1:53", socket.AF_INET, "127.0.0.1", 53, ("127.0.0.1", 53), STREAM),
        ("/run/s.sock", socket.AF_UNIX, "", 0, "/run/s.sock", STREAM),
    ],
)
def test_target_kinds(
    text: str, family: int, host: str, port: int, sockaddr: object, kind: int
) -> None:
    address = parse_target(text)
    assert (address.family, address.host, address.port, address.sockaddr, address.kind) == (
        family,
        host,
        port,
        sockaddr,
        kind,
    )
    assert address.text == text


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "udp:",
            "invalid target 'udp:': expected udp:HOST:PORT (unix-dgram:PATH for a unix "
            "datagram socket)",
        ),  # fmt: skip
        (
            "udp:/run/a",
            "invalid target 'udp:/run/a': expected udp:HOST:PORT (unix-dgram:PATH "
            "for a unix datagram socket)",
        ),  # fmt: skip
        ("udp:host", "invalid target 'udp:host': missing ':PORT'"),
        ("udp:127.0.0.1:0", "invalid target 'udp:127.0.0.1:0': port 0 is not in 1-65535"),
        ("udp:::1:53", "invalid target 'udp:::1:53': write IPv6 addresses in brackets"),
        (
            "unix-dgram:",
            "invalid target 'unix-dgram:': expected unix-dgram:/path or unix-dgram:@name",
        ),  # fmt: skip
        ("unix-dgram:run/a", "invalid target 'unix-dgram:run/a': expected unix-dgram:/path"),
        ("seqpacket:@", "invalid target 'seqpacket:@': empty abstract socket name"),
        (
            "seqpacket:/" + "a" * 107,
            f"invalid target 'seqpacket:/{'a' * 107}': unix socket paths are at most 107 bytes",
        ),
    ],
)
def test_target_kind_errors(text: str, error: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_target(text)
    assert str(raised.value).startswith(error)


@pytest.mark.parametrize(
    ("text", "name", "family", "sockaddr", "dual_stack", "kind"),
    [
        ("udp:53", "", socket.AF_INET6, ("::", 53, 0, 0), True, DGRAM),
        ("udp:127.0.0.1:53", "", socket.AF_INET, ("127.0.0.1", 53), False, DGRAM),
        ("dns=udp:[::1]:53", "dns", socket.AF_INET6, ("::1", 53, 0, 0), False, DGRAM),
        ("unix-dgram:/run/l.sock", "", socket.AF_UNIX, "/run/l.sock", False, DGRAM),
        ("log=unix-dgram:@log", "log", socket.AF_UNIX, "\0log", False, DGRAM),
        ("unix-dgram:/run/a=b", "", socket.AF_UNIX, "/run/a=b", False, DGRAM),
        ("seqpacket:/run/sp", "", socket.AF_UNIX, "/run/sp", False, SEQPACKET),
        ("sp=seqpacket:@sp", "sp", socket.AF_UNIX, "\0sp", False, SEQPACKET),
        ("8080", "", socket.AF_INET6, ("::", 8080, 0, 0), True, STREAM),
    ],
)
def test_listen_kinds(
    text: str, name: str, family: int, sockaddr: object, dual_stack: bool, kind: int
) -> None:
    address = parse_listen(text)
    assert (address.name, address.family, address.sockaddr, address.dual_stack) == (
        name,
        family,
        sockaddr,
        dual_stack,
    )
    assert address.kind == kind


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "udp:",
            "invalid listen address 'udp:': expected udp:PORT, udp:IPV4:PORT or "
            "udp:[IPV6]:PORT (unix-dgram:PATH for a unix datagram socket)",
        ),  # fmt: skip
        ("udp:/run/x", "invalid listen address 'udp:/run/x': expected udp:PORT"),
        (
            "udp:localhost:53",
            "invalid listen address 'udp:localhost:53': 'localhost' is not an IP address",
        ),  # fmt: skip
        ("udp:0", "invalid listen address 'udp:0': port 0 is not in 1-65535"),
        ("dns=udp:", "invalid listen address 'dns=udp:': expected udp:PORT"),
        (
            "seqpacket:x",
            "invalid listen address 'seqpacket:x': expected seqpacket:/path or seqpacket:@name",
        ),  # fmt: skip
        (
            "x=unix-dgram:@",
            "invalid listen address 'x=unix-dgram:@': empty abstract socket name",
        ),  # fmt: skip
    ],
)
def test_listen_kind_errors(text: str, error: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_listen(text)
    assert str(raised.value).startswith(error)


@given(ipv4s, ports)
def test_udp_round_trips(host: str, port: int) -> None:
    target = parse_target(f"udp:{host}:{port}")
    listen = parse_listen(f"udp:{host}:{port}")
    for address in (target, listen):
        assert (address.family, address.sockaddr, address.kind) == (
            socket.AF_INET,
            (host, port),
            DGRAM,
        )
