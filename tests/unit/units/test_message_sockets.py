"""forkproxy-units' datagram and sequential-packet flags: ListenDatagram=,
ListenSequentialPacket=, the checks of kinds, and the sandbox such targets need."""

import shlex

import pytest

from forkproxy.errors import ForkproxyError
from forkproxy.units.arguments import canonical_args, parse_args
from forkproxy.units.render import render


def lines(command: str, file: str) -> list[str]:
    return render(parse_args(shlex.split(command))[0])[file].splitlines()


GOOD = [
    (
        "dns --listen-datagram 127.0.0.1:53 --listen-datagram [::1]:53 -- udp:127.0.0.1:5353",
        "dns.socket",
        [
            "ListenDatagram=127.0.0.1:53",
            "ListenDatagram=[::1]:53",
            "# dns.socket: starts dns.service on the first datagram.",
        ],
    ),  # fmt: skip
    (
        "log --listen-unix-datagram /run/log/in.sock --socket-mode 0660 -- unix-dgram:@journal",
        "log.socket",
        ["ListenDatagram=/run/log/in.sock", "SocketMode=0660"],
    ),
    (
        "sp --listen-sequential-packet @sp -- seqpacket:/run/sp.sock",
        "sp.socket",
        ["ListenSequentialPacket=@sp"],
    ),
    (
        "mix --listen-datagram 127.0.0.1:53 --listen-unix-datagram @dns -- udp:[::1]:53 "
        "--datagram-timeout=5s --datagram-replies=1",
        "mix.service",
        [
            "ExecStart=/usr/local/bin/forkproxy udp:[::1]:53 --datagram-timeout=5s "
            "--datagram-replies=1",
            "IPAddressAllow=::1",
            "RestrictAddressFamilies=AF_UNIX AF_INET6",
        ],
    ),  # fmt: skip
]


@pytest.mark.parametrize(("command", "file", "expected"), GOOD)
def test_good_flags(command: str, file: str, expected: list[str]) -> None:
    got = lines(command, file)
    for line in expected:
        assert line in got


@pytest.mark.parametrize("command", [command for command, _, _ in GOOD])
def test_the_header_renders_the_same_units(command: str) -> None:
    request, _ = parse_args(shlex.split(command))
    assert parse_args(canonical_args(request))[0] == request


@pytest.mark.parametrize(
    ("target", "present", "absent"),
    [
        (
            "unix-dgram:/run/t.sock",
            ["RestrictAddressFamilies=AF_UNIX", "IPAddressDeny=any"],
            ["PrivateNetwork=yes"],
        ),  # fmt: skip
        (
            "udp:10.0.0.1:53",
            ["RestrictAddressFamilies=AF_UNIX AF_INET", "IPAddressAllow=10.0.0.1"],
            ["PrivateNetwork=yes"],
        ),  # fmt: skip
        (
            "udp:dns.example:53",
            ["RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"],
            ["IPAddressDeny=any"],
        ),  # fmt: skip
    ],
)
def test_the_sandbox_lets_replies_come_back(
    target: str, present: list[str], absent: list[str]
) -> None:
    got = lines(f"d --listen-datagram 53 -- {target}", "d.service")
    for line in present:
        assert line in got
    for line in absent:
        assert line not in got


def test_a_sequential_packet_file_target_gets_a_private_network() -> None:
    got = lines("s --listen-sequential-packet /run/s -- seqpacket:/run/t", "s.service")
    assert "PrivateNetwork=yes" in got


BAD = [
    (
        "dns --listen-datagram 53 -- 127.0.0.1:53",
        "cannot relay --listen-datagram 53: it receives datagrams but target '127.0.0.1:53' "
        "is a stream target (write udp:HOST:PORT, unix-dgram:/path or unix-dgram:@name)",
    ),
    (
        "web --listen-stream 80 -- udp:127.0.0.1:53",
        "cannot relay --listen-stream 80: it receives stream connections but target "
        "'udp:127.0.0.1:53' is a datagram target (write HOST:PORT, /path or @name)",
    ),
    (
        "sp --listen-sequential-packet /run/sp -- /run/stream.sock",
        "cannot relay --listen-sequential-packet /run/sp: it receives sequential-packet "
        "connections but target '/run/stream.sock' is a stream target (write "
        "seqpacket:/path or seqpacket:@name)",
    ),
    (
        "dns --listen-datagram /run/d.sock -- udp:127.0.0.1:53",
        "invalid --listen-datagram '/run/d.sock': use --listen-unix-datagram for unix sockets",
    ),
    (
        "dns --listen-unix-datagram 53 -- udp:127.0.0.1:53",
        "invalid --listen-unix-datagram '53': give an absolute /path or an @name",
    ),
    (
        "dns --listen-datagram 53 --accept -- udp:127.0.0.1:53",
        "--accept relays stream connections only: give datagram and sequential-packet "
        "sockets to a unit without --accept",
    ),
    (
        "dns --listen-datagram 53 --socket-mode 0600 -- udp:127.0.0.1:53",
        "--socket-mode applies to socket files only: add --listen-unix /PATH",
    ),
    (
        "dns -- udp:127.0.0.1:53",
        "nothing to listen on: give --listen-stream, --listen-unix, --listen-datagram, "
        "--listen-unix-datagram or --listen-sequential-packet",
    ),
]


@pytest.mark.parametrize(("command", "message"), BAD)
def test_bad_flags(command: str, message: str) -> None:
    with pytest.raises(ForkproxyError) as raised:
        parse_args(shlex.split(command))
    assert str(raised.value) == message


def test_sockets_of_one_kind_per_unit_and_no_two_alike() -> None:
    with pytest.raises(ForkproxyError) as raised:  # no clash: TCP and UDP ports differ
        parse_args(shlex.split("d --listen-stream 53 --listen-datagram 53 -- 127.0.0.1:53"))
    assert str(raised.value) == (
        "--listen-stream and --listen-datagram make sockets of different kinds, which cannot "
        "share their targets (systemd names every socket of a unit alike, so one --route "
        "would take them all): give each kind a unit of its own"
    )
    with pytest.raises(ForkproxyError, match="--listen-datagram '53' is given twice"):
        parse_args(shlex.split("d --listen-datagram 53 --listen-datagram 53 -- udp:1.1.1.1:53"))
    # A socket file is one, whatever its type; an abstract name is one per type.
    with pytest.raises(ForkproxyError, match="is the same socket as"):
        parse_args(shlex.split("d --listen-unix /run/a --listen-unix-datagram /run/a -- /run/t"))
