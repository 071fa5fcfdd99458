"""Which listener kinds relay to which targets, and the errors that say so."""

import socket

import pytest

from forkproxy.errors import UsageError
from forkproxy.settings.address import parse_target
from forkproxy.settings.arguments import parse_args
from forkproxy.settings.kinds import DATAGRAM, SEQPACKET, STREAM, kind_mismatch, kind_name


@pytest.mark.parametrize(
    ("listener", "target", "compatible"),
    [
        (STREAM, "127.0.0.1:80", True),
        (STREAM, "/run/s.sock", True),
        (STREAM, "vsock:2:80", True),
        (DATAGRAM, "udp:127.0.0.1:53", True),
        (DATAGRAM, "unix-dgram:/run/log", True),
        (SEQPACKET, "seqpacket:@sp", True),
        (STREAM, "udp:127.0.0.1:53", False),
        (DATAGRAM, "127.0.0.1:53", False),
        (DATAGRAM, "seqpacket:@sp", False),
        (SEQPACKET, "/run/s.sock", False),
        (SEQPACKET, "unix-dgram:@d", False),
    ],
)
def test_what_relays_to_what(listener: int, target: str, compatible: bool) -> None:
    assert (kind_mismatch(listener, [parse_target(target)]) is None) == compatible


def test_the_mismatch_says_how_to_write_the_target() -> None:
    assert kind_mismatch(DATAGRAM, [parse_target("127.0.0.1:53")]) == (
        "it receives datagrams but target '127.0.0.1:53' is a stream target "
        "(write udp:HOST:PORT, unix-dgram:/path or unix-dgram:@name)"
    )
    assert kind_mismatch(STREAM, [parse_target("udp:[::1]:53")]) == (
        "it receives stream connections but target 'udp:[::1]:53' is a datagram target "
        "(write HOST:PORT, /path or @name)"
    )
    assert kind_mismatch(SEQPACKET, [parse_target("/run/a")]) == (
        "it receives sequential-packet connections but target '/run/a' is a stream target "
        "(write seqpacket:/path or seqpacket:@name)"
    )


def test_kind_names() -> None:
    assert [kind_name(kind) for kind in (STREAM, DATAGRAM, SEQPACKET)] == [
        "stream",
        "datagram",
        "sequential-packet",
    ]
    assert kind_name(socket.SOCK_RAW) == "type 3"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["udp:127.0.0.1:53", "127.0.0.1:53"],
            "the targets mix socket kinds: 'udp:127.0.0.1:53' (datagram), '127.0.0.1:53' "
            "(stream); give targets of one kind",
        ),
        (
            ["--route", "d=udp:1.1.1.1:53", "--route", "d=seqpacket:@x", "127.0.0.1:80"],
            "the targets of listener 'd' mix socket kinds: 'udp:1.1.1.1:53' (datagram), "
            "'seqpacket:@x' (sequential-packet); give targets of one kind",
        ),
    ],
)
def test_one_route_has_targets_of_one_kind(argv: list[str], error: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_args(argv)
    assert str(raised.value) == error


@pytest.mark.parametrize(
    ("argv", "timeout", "replies"),
    [
        (["udp:127.0.0.1:53"], 30.0, 0),
        (["--datagram-timeout=5s", "--datagram-replies=1", "udp:127.0.0.1:53"], 5.0, 1),
        (["--datagram-timeout", "infinity", "udp:127.0.0.1:53"], float("inf"), 0),
        (["--datagram-replies", "4294967296", "udp:127.0.0.1:53"], 30.0, 1 << 32),
    ],
)
def test_datagram_options(argv: list[str], timeout: float, replies: int) -> None:
    config = parse_args(argv)
    assert (config.datagram_timeout, config.datagram_replies) == (timeout, replies)


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--datagram-timeout=0", "udp:1.1.1.1:53"], "--datagram-timeout= must be longer than 0"),
        (
            ["--datagram-timeout=5 parsecs", "udp:1.1.1.1:53"],
            "invalid --datagram-timeout= value '5 parsecs'",
        ),
        (
            ["--datagram-replies=-1", "udp:1.1.1.1:53"],
            "invalid --datagram-replies= value '-1': expected a whole number",
        ),
        (
            ["--datagram-replies=4294967297", "udp:1.1.1.1:53"],
            "--datagram-replies= must be in 0-4294967296, got 4294967297",
        ),
    ],
)
def test_datagram_option_errors(argv: list[str], error: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_args(argv)
    assert str(raised.value).startswith(error)


def test_datagram_options_per_listener_in_a_configuration_file(tmp_path) -> None:
    path = tmp_path / "forkproxy.toml"
    path.write_text(
        'targets = ["udp:127.0.0.1:53"]\n'
        'datagram-timeout = "10s"\n'
        "[listeners.dns]\n"
        'targets = ["udp:10.0.0.53:53"]\n'
        "datagram-replies = 1\n"
    )
    config = parse_args([f"--config={path}"])
    dns = config.settings_for("dns")
    assert (dns.datagram_timeout, dns.datagram_replies) == (10.0, 1)
    other = config.settings_for("other")
    assert (other.datagram_timeout, other.datagram_replies) == (10.0, 0)
