"""Value syntax of the relay options, with the exact error an operator reads."""

import socket

import pytest

from forkproxy.errors import UsageError
from forkproxy.settings.options import (
    KeepAlive,
    format_size,
    parse_keepalive,
    parse_on_limit,
    parse_proxy_protocol,
    parse_size,
    tcp_socket_options,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("65536", 65536),
        ("64K", 65536),
        ("64k", 65536),
        ("1M", 1 << 20),
        ("1m", 1 << 20),
        (" 256K ", 256 << 10),
        ("0", 0),
    ],
)
def test_size(text: str, size: int) -> None:
    assert parse_size(text, "--pipe-size") == size


@pytest.mark.parametrize("text", ["", "K", "1.5M", "1G", "1KB", "-1K", "1 K", "0x10", "١٢"])
def test_bad_size(text: str) -> None:
    with pytest.raises(UsageError) as error:
        parse_size(text, "--pipe-size")
    assert str(error.value) == (
        f"invalid --pipe-size= value '{text}': expected a number of bytes, "
        "optionally with K or M (base 1024)"
    )


@pytest.mark.parametrize(
    ("size", "text"), [(65536, "64K"), (1 << 20, "1M"), (1 << 30, "1024M"), (4097, "4097")]
)
def test_format_size_reads_back(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text, "x") == size


@pytest.mark.parametrize(
    ("text", "keepalive"),
    [
        ("60,10,6", KeepAlive(60, 10, 6)),
        ("1min,10s,6", KeepAlive(60, 10, 6)),
        ("2h, 75s, 9", KeepAlive(7200, 75, 9)),
        ("1,1,1", KeepAlive(1, 1, 1)),
        ("32767,32767,127", KeepAlive(32767, 32767, 127)),
    ],
)
def test_keepalive(text: str, keepalive: KeepAlive) -> None:
    assert parse_keepalive(text) == keepalive


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "60,10",
            "invalid --keepalive= value '60,10': expected IDLE,INTERVAL,PROBES (as in 60s,10s,6), "
            "or no value for the kernel's timings",
        ),
        (
            "",
            "invalid --keepalive= value '': expected IDLE,INTERVAL,PROBES (as in 60s,10s,6), "
            "or no value for the kernel's timings",
        ),
        (
            "60,10,6,1",
            "invalid --keepalive= value '60,10,6,1': expected IDLE,INTERVAL,PROBES "
            "(as in 60s,10s,6), or no value for the kernel's timings",
        ),
        ("5x,10,6", "invalid --keepalive= IDLE '5x': unknown unit 'x'"),
        (
            "0,10,6",
            "invalid --keepalive= value '0,10,6': IDLE must be whole seconds in 1s-32767s",
        ),
        (
            "1.5,10,6",
            "invalid --keepalive= value '1.5,10,6': IDLE must be whole seconds in 1s-32767s",
        ),
        (
            "infinity,10,6",
            "invalid --keepalive= value 'infinity,10,6': IDLE must be whole seconds in 1s-32767s",
        ),
        (
            "60,500ms,6",
            "invalid --keepalive= value '60,500ms,6': INTERVAL must be whole seconds in 1s-32767s",
        ),
        (
            "60,10,many",
            "invalid --keepalive= value '60,10,many': PROBES 'many' is not a whole number",
        ),
        ("60,10,0", "invalid --keepalive= value '60,10,0': PROBES must be in 1-127"),
        ("60,10,128", "invalid --keepalive= value '60,10,128': PROBES must be in 1-127"),
    ],
)
def test_bad_keepalive(text: str, error: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_keepalive(text)
    assert str(raised.value) == error


@pytest.mark.parametrize(("text", "version"), [("v1", 1), ("v2", 2), ("V2", 2), (" v1", 1)])
def test_proxy_protocol(text: str, version: int) -> None:
    assert parse_proxy_protocol(text) == version


@pytest.mark.parametrize("text", ["", "1", "2", "v3", "yes", "v1,v2"])
def test_bad_proxy_protocol(text: str) -> None:
    with pytest.raises(UsageError) as error:
        parse_proxy_protocol(text)
    assert str(error.value) == f"invalid --proxy-protocol= value '{text}': expected v1 or v2"


@pytest.mark.parametrize(("text", "mode"), [("refuse", "refuse"), ("Queue", "queue")])
def test_on_limit(text: str, mode: str) -> None:
    assert parse_on_limit(text) == mode


@pytest.mark.parametrize("text", ["", "wait", "queued", "drop"])
def test_bad_on_limit(text: str) -> None:
    with pytest.raises(UsageError) as error:
        parse_on_limit(text)
    assert str(error.value) == f"invalid --on-limit= value '{text}': expected refuse or queue"


def test_tcp_socket_options_are_what_the_kernel_reads_back() -> None:
    options = tcp_socket_options(True, KeepAlive(70, 8, 5))
    with socket.socket() as sock:
        for level, option, value in options:
            sock.setsockopt(level, option, value)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 70
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 8
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 5


def test_tcp_socket_options_off_and_kernel_timings() -> None:
    assert tcp_socket_options(False, None) == ()
    assert tcp_socket_options(False, KeepAlive()) == ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),)
