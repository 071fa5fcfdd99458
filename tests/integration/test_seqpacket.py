"""Sequential-packet listeners (SOCK_SEQPACKET) relayed message by message, through the
real program, to targets that check every message (tests.support.message_backend)."""

import os
import random
import socket
import threading
from pathlib import Path

from tests.support.message_backend import check_framed, framed
from tests.support.proxy import run_backend, run_proxy

MESSAGES = "tests.support.message_backend"


def _receive_all(sock: socket.socket, into: list[bytes]) -> threading.Thread:
    def run() -> None:
        while message := sock.recv(1 << 23):
            into.append(message)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _sizes(count: int) -> list[int]:
    rng = random.Random(count)
    return [40, 41, 4096, 65_536, 212_000, 300_000] + [
        rng.randint(40, 100_000) for _ in range(count - 6)
    ]


def test_the_target_gets_every_message_whole_and_the_end(workdir: Path) -> None:
    sizes = _sizes(200)
    with (
        run_backend("check", f"seqpacket:{workdir}/target.sock", MESSAGES) as backend,
        run_proxy(["-w", "2", backend.target], workdir, listeners=("seqpacket",)) as proxy,
        proxy.connect() as client,
    ):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        answers: list[bytes] = []
        reader = _receive_all(client, answers)
        for sequence, size in enumerate(sizes):
            client.send(framed(sequence, size))
        client.shutdown(socket.SHUT_WR)  # half-close: the answers still come back
        reader.join(60)
        assert not reader.is_alive()
        assert answers == [b"ok %d" % n for n in range(len(sizes))] + [b"end %d" % len(sizes)]


def test_messages_come_back_whole_from_an_echoing_target(workdir: Path) -> None:
    sizes = _sizes(100)
    with (
        run_backend("echo", f"seqpacket:@fp-echo-{os.getpid()}", MESSAGES) as backend,
        run_proxy(["-w", "1", backend.target], workdir, listeners=("seqpacket",)) as proxy,
        proxy.connect() as client,
    ):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        echoed: list[bytes] = []
        reader = _receive_all(client, echoed)
        for sequence, size in enumerate(sizes):
            client.send(framed(sequence, size))
        client.shutdown(socket.SHUT_WR)
        reader.join(60)
        assert [len(message) for message in echoed] == sizes
        assert [check_framed(message) for message in echoed] == list(range(len(sizes)))


def test_many_connections_at_once(workdir: Path) -> None:
    with (
        run_backend("check", f"seqpacket:{workdir}/target.sock", MESSAGES) as backend,
        run_proxy(["-w", "2", backend.target], workdir, listeners=("seqpacket",)) as proxy,
    ):
        results: dict[int, list[bytes]] = {}

        def client(index: int) -> None:
            with proxy.connect() as sock:
                answers: list[bytes] = []
                reader = _receive_all(sock, answers)
                for sequence in range(50):
                    sock.send(framed(sequence, 40 + index * 100 + sequence, seed=index))
                sock.shutdown(socket.SHUT_WR)
                reader.join(60)
                results[index] = answers

        threads = [threading.Thread(target=client, args=(index,)) for index in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        expected = [b"ok %d" % n for n in range(50)] + [b"end 50"]
        assert results == {index: expected for index in range(20)}


def test_listen_binds_a_sequential_packet_socket(workdir: Path) -> None:
    with (
        run_backend("check", f"seqpacket:{workdir}/target.sock", MESSAGES) as backend,
        run_proxy(
            [f"--listen=seqpacket:{workdir}/listen.sock", backend.target], workdir, listeners=()
        ),
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client,
    ):
        client.settimeout(10)
        client.connect(f"{workdir}/listen.sock")
        client.send(framed(7, 1000))
        assert client.recv(100) == b"ok 7"


def test_a_sequential_packet_listener_with_a_stream_target_is_refused(workdir: Path) -> None:
    with run_proxy(
        [f"{workdir}/stream.sock"], workdir, listeners=("seqpacket",), wait_ready=False
    ) as proxy:
        assert proxy.wait(15) == 1
        assert (
            "it receives sequential-packet connections but target "
            f"'{workdir}/stream.sock' is a stream target (write seqpacket:/path or "
            "seqpacket:@name)" in proxy.stderr()
        )
