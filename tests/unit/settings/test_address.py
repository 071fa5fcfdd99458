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
