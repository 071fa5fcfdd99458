"""Generated datagram and sequential-packet units started by a real systemd
(tests/support/systemd_boot.py), their whole sandbox applied: ListenDatagram= and
ListenSequentialPacket= sockets relay to UDP, unix datagram and sequential-packet
targets, and the replies come back."""

import shlex
import socket

import pytest

from forkproxy.units.arguments import parse_args
from forkproxy.units.render import render
from tests.support.systemd_boot import BootedSystemd

CLIENT_TIMEOUT = 30.0  # seconds; the first datagram starts forkproxy


def start(booted: BootedSystemd, command: str, unit: str) -> None:
    booted.install(render(parse_args(shlex.split(command))[0]))
    booted.systemctl("start", f"{unit}.socket")


def udp_exchanges(
    booted: BootedSystemd, target: socket.socket, port: int, source: str = "127.0.0.1"
) -> list[bytes]:
    """Three queries through the unit from one client; the target answers each."""
    target.settimeout(CLIENT_TIMEOUT)
    replies = []
    with booted.socket(socket.AF_INET, socket.SOCK_DGRAM, bind=[source, 0]) as client:
        client.settimeout(CLIENT_TIMEOUT)
        client.connect(("127.0.0.1", port))
        for number in range(3):
            client.send(b"query %d" % number)
            query, session = target.recvfrom(100)
            target.sendto(b"answer to " + query, session)
            replies.append(client.recv(100))
    return replies


def test_a_listen_datagram_unit_relays_to_a_udp_target(systemd_boot: BootedSystemd) -> None:
    start(systemd_boot, "dns --listen-datagram 127.0.0.1:5300 -- udp:127.0.0.1:9053", "dns")
    with systemd_boot.socket(socket.AF_INET, socket.SOCK_DGRAM, bind=["127.0.0.1", 9053]) as t:
        try:
            assert udp_exchanges(systemd_boot, t, 5300) == [
                b"answer to query %d" % number for number in range(3)
            ]
        finally:
            print(systemd_boot.journal("dns.socket", "dns.service"))


def test_replies_leave_through_the_passed_socket_whatever_the_ip_allow_list(
    systemd_boot: BootedSystemd,
) -> None:
    """IPAddressAllow= names the target only: a client at 127.0.0.2 still gets its
    replies, sent from the socket systemd made, which the service's list does not filter."""
    start(systemd_boot, "dns --listen-datagram 5303 -- udp:127.0.0.1:9054", "dns")
    with systemd_boot.socket(socket.AF_INET, socket.SOCK_DGRAM, bind=["127.0.0.1", 9054]) as t:
        assert udp_exchanges(systemd_boot, t, 5303, source="127.0.0.2") == [
            b"answer to query %d" % number for number in range(3)
        ]


def test_a_unix_datagram_target_replies_under_the_sandbox(systemd_boot: BootedSystemd) -> None:
    """The target answers to forkproxy's abstract session address: it must share its
    network namespace (the generator leaves PrivateNetwork= out for such targets)."""
    start(systemd_boot, "log --listen-datagram 127.0.0.1:5301 -- unix-dgram:/run/t.sock", "log")
    with systemd_boot.socket(socket.AF_UNIX, socket.SOCK_DGRAM, bind="/run/t.sock") as target:
        try:
            assert udp_exchanges(systemd_boot, target, 5301) == [
                b"answer to query %d" % number for number in range(3)
            ]
        finally:
            print(systemd_boot.journal("log.socket", "log.service"))


def test_a_sequential_packet_unit_relays_messages(systemd_boot: BootedSystemd) -> None:
    start(systemd_boot, "sp --listen-sequential-packet /run/sp.sock -- seqpacket:/run/t.sock", "sp")
    with systemd_boot.socket(
        socket.AF_UNIX, socket.SOCK_SEQPACKET, bind="/run/t.sock", listen=True
    ) as target:
        target.settimeout(CLIENT_TIMEOUT)
        with systemd_boot.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.settimeout(CLIENT_TIMEOUT)
            client.connect(str(systemd_boot.path("/run/sp.sock")))
            try:
                connection, _ = target.accept()
            finally:
                print(systemd_boot.journal("sp.socket", "sp.service"))
            with connection:
                connection.settimeout(CLIENT_TIMEOUT)
                for message in (b"one", b"two two", b"three three three"):
                    client.send(message)
                client.shutdown(socket.SHUT_WR)
                got = [connection.recv(100) for _ in range(4)]
                assert got == [b"one", b"two two", b"three three three", b""]
                connection.send(b"back")
                connection.shutdown(socket.SHUT_WR)
                assert [client.recv(100), client.recv(100)] == [b"back", b""]


def test_with_a_private_network_the_replies_would_be_lost(systemd_boot: BootedSystemd) -> None:
    """Honesty check of the above: PrivateNetwork=yes added behind the generator's back,
    the query still reaches the socket file, but the reply finds no session address."""
    files = render(
        parse_args(shlex.split("log --listen-datagram 5302 -- unix-dgram:/run/t.sock"))[0]
    )
    files["log.service.d/private.conf"] = "[Service]\nPrivateNetwork=yes\n"
    systemd_boot.install(files)
    systemd_boot.systemctl("start", "log.socket")
    with (
        systemd_boot.socket(socket.AF_UNIX, socket.SOCK_DGRAM, bind="/run/t.sock") as target,
        systemd_boot.socket(socket.AF_INET, socket.SOCK_DGRAM, bind=["127.0.0.1", 0]) as client,
    ):
        target.settimeout(CLIENT_TIMEOUT)
        client.sendto(b"query", ("127.0.0.1", 5302))
        query, session = target.recvfrom(100)
        assert query == b"query"
        with pytest.raises(ConnectionRefusedError):
            target.sendto(b"answer", session)
