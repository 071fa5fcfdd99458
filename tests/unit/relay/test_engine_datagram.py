"""The compiled engine's datagram listeners (csrc/datagram.c): sessions, their ends, drops.

The integration tests (tests/integration/test_datagram*.py) run the whole program on both
engines; these drive the engine alone, on a thread, to reach what a program run cannot
tell apart: which session a reply belongs to, the admission given back, each drop reason
and event, the drained hook.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forkproxy.shared.layout import (
    DG_BYTES_TO_CLIENT,
    DG_BYTES_TO_TARGET,
    DG_DROP_REASONS,
    DG_DROPPED,
    DG_SESSIONS,
    DG_SESSIONS_ACTIVE,
    DG_TO_CLIENT,
    DG_TO_TARGET,
    LISTENER_ROWS,
    WORD,
)
from tests.support.proxy import wait_until
from tests.unit.relay import engine_harness as h

engine_module = h.load_engine()
pytestmark = pytest.mark.skipif(engine_module is None, reason="the compiled engine is not built")

DEADLINE = 10.0


def udp_target(port: int) -> h.Target:
    return h.Target(f"127.0.0.1:{port}", socket.AF_INET, "127.0.0.1", port, ("127.0.0.1", port))


def unix_target(path: str) -> h.Target:
    return h.Target(path, socket.AF_UNIX, path, 0, path)


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(DEADLINE)
    return sock


class DatagramProxy:
    """An engine reading one UDP listener (row 0) for `targets`."""

    def __init__(
        self,
        targets: list[h.Target],
        *,
        capacity: int = 100,
        replies: int = 0,
        timeout: float = 30.0,
        per_source: int = 0,
    ) -> None:
        assert engine_module is not None
        self.mapping = h.SharedMapping(capacity, per_source=per_source, entries=64)
        self.listener = udp_socket()
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.hooks = h.Hooks()
        self.engine = engine_module.Engine(
            self.mapping.memory,
            h.LAYOUT,
            0,
            [],
            [targets],
            self.hooks,
            datagram_listeners=[(self.listener.fileno(), 0, per_source, 0, replies, timeout)],
        )
        self.runner = h.EngineRunner(self.engine)
        self.runner.call(self.engine.start_accepting)

    def row(self, word: int) -> int:
        return self.mapping.slot_word(0, LISTENER_ROWS // WORD + word)

    def dropped(self, reason: str) -> int:
        return self.row(DG_DROPPED + DG_DROP_REASONS.index(reason))

    def sessions(self) -> int:
        return int(self.runner.call(self.engine.open_sessions))

    def client(self) -> socket.socket:
        sock = udp_socket()
        sock.connect(("127.0.0.1", self.port))
        return sock

    def events(self, code: int) -> list[tuple[int, int, int, tuple[int, object]]]:
        return [event for event in self.hooks.events if event[0] == code]

    def close(self) -> None:
        self.runner.stop()
        self.engine.close()
        self.listener.close()


class EchoTarget:
    """A UDP target that answers each datagram with `copies` copies of it."""

    def __init__(self, copies: int = 1) -> None:
        self.sock = udp_socket()
        self.port = self.sock.getsockname()[1]
        self.senders: list[Any] = []
        self.copies = copies
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopping:
            try:
                data, sender = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            self.senders.append(sender)
            for _ in range(self.copies):
                self.sock.sendto(data, sender)

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.sock.close()


def echo_setup(
    things: list[Any], copies: int = 1, **options: Any
) -> tuple[EchoTarget, DatagramProxy, socket.socket]:
    """An echo target, a proxy to it, and a client of the proxy (closed after the test)."""
    target = EchoTarget(copies)
    things.append(target)
    proxy = DatagramProxy([udp_target(target.port)], **options)
    things.append(proxy)
    client = proxy.client()
    things.append(client)
    return target, proxy, client


@pytest.fixture
def things() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for thing in reversed(made):
        thing.close()


def test_each_client_gets_its_own_replies_through_a_session_of_its_own(things: list[Any]) -> None:
    target = EchoTarget()
    things.append(target)
    proxy = DatagramProxy([udp_target(target.port)])
    things.append(proxy)
    clients = [proxy.client() for _ in range(5)]
    things.extend(clients)
    for round_number in range(3):
        for index, client in enumerate(clients):
            client.send(f"client {index} round {round_number}".encode() * (index + 1))
        for index, client in enumerate(clients):
            assert client.recv(65536) == f"client {index} round {round_number}".encode() * (
                index + 1
            )
    assert proxy.sessions() == 5
    assert len(set(target.senders)) == 5  # a source port at the target per client
    assert proxy.row(DG_SESSIONS) == 5 and proxy.row(DG_SESSIONS_ACTIVE) == 5
    assert proxy.row(DG_TO_TARGET) == proxy.row(DG_TO_CLIENT) == 15
    assert proxy.row(DG_BYTES_TO_TARGET) == proxy.row(DG_BYTES_TO_CLIENT)
    assert proxy.mapping.held_total() == 5


def test_largest_udp_datagram_passes_whole(things: list[Any]) -> None:
    target, proxy, client = echo_setup(things)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    payload = os.urandom(65507)
    client.send(payload)
    assert client.recv(65536) == payload


def test_replies_end_a_session_and_give_its_unit_back(things: list[Any]) -> None:
    target, proxy, client = echo_setup(things, copies=2, replies=1)
    client.send(b"question")
    assert client.recv(100) == b"question"
    wait_until(lambda: proxy.sessions() == 0, DEADLINE, "the session to end after its reply")
    assert proxy.mapping.held_total() == 0
    assert proxy.row(DG_SESSIONS_ACTIVE) == 0
    client.send(b"again")  # a new session, a new source port at the target
    assert client.recv(100) == b"again"
    wait_until(lambda: len(set(target.senders)) == 2, DEADLINE, "a second session")
    client.settimeout(0.3)
    with pytest.raises(TimeoutError):  # the second copies went to closed sockets
        client.recv(100)


def test_quiet_sessions_end_after_the_timeout(things: list[Any]) -> None:
    target, proxy, client = echo_setup(things, timeout=0.2)
    client.send(b"ping")
    assert client.recv(100) == b"ping"
    wait_until(lambda: proxy.sessions() == 0, DEADLINE, "the quiet session to time out")
    assert proxy.mapping.held_total() == 0 and proxy.row(DG_SESSIONS_ACTIVE) == 0


def test_a_new_client_over_the_cap_is_dropped_and_counted(things: list[Any]) -> None:
    assert engine_module is not None
    target = EchoTarget()
    things.append(target)
    proxy = DatagramProxy([udp_target(target.port)], capacity=1)
    things.append(proxy)
    first, second = proxy.client(), proxy.client()
    things.extend([first, second])
    first.send(b"one")
    assert first.recv(100) == b"one"
    second.send(b"two")
    wait_until(lambda: proxy.dropped("cap") == 1, DEADLINE, "the drop at the cap")
    first.send(b"still one")  # the session already open goes on
    assert first.recv(100) == b"still one"
    wait_until(lambda: proxy.events(engine_module.EVENT_DG_CAP), DEADLINE, "the cap event")
    _, count, _, (index, client) = proxy.events(engine_module.EVENT_DG_CAP)[0]
    assert (count, index) == (1, 0)
    assert client == f"127.0.0.1:{second.getsockname()[1]}"


def test_a_refusing_target_ends_the_session_and_fails_over(things: list[Any]) -> None:
    assert engine_module is not None
    closed = udp_socket()
    refusing = closed.getsockname()[1]
    closed.close()  # nothing there: its host answers with ICMP port unreachable
    target = EchoTarget()
    things.append(target)
    proxy = DatagramProxy([udp_target(refusing), udp_target(target.port)])
    things.append(proxy)
    client = proxy.client()
    things.append(client)
    # This worker's round-robin starts at the first target: the first session goes to the
    # refusing one, whose ICMP error ends it; the next goes to the other.
    client.send(b"lost")
    wait_until(lambda: proxy.dropped("send_error") == 1, DEADLINE, "the refusal")
    wait_until(lambda: proxy.sessions() == 0, DEADLINE, "the refused session to end")
    for attempt in range(3):  # the refusing target cools down: every session skips it
        client.send(b"attempt %d" % attempt)
        assert client.recv(100) == b"attempt %d" % attempt
        proxy.runner.call(proxy.engine.close_all)
    wait_until(lambda: proxy.events(engine_module.EVENT_DG_TARGET_FAILED), DEADLINE, "the event")
    failed = proxy.events(engine_module.EVENT_DG_TARGET_FAILED)
    assert failed[0][2] == errno.ECONNREFUSED
    assert failed[0][3][1] == udp_target(refusing)
    # The drop names the client and the one target that refused it.
    refused = proxy.events(engine_module.EVENT_DG_REFUSED)
    client_text = f"127.0.0.1:{client.getsockname()[1]}"
    assert refused[0][3] == (0, (client_text, udp_target(refusing)))
    assert proxy.mapping.held_total() == 0


def test_a_missing_unix_target_is_skipped_for_the_next(things: list[Any], tmp_path: Path) -> None:
    present = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    things.append(present)
    present.bind(str(tmp_path / "present"))
    present.settimeout(DEADLINE)
    proxy = DatagramProxy(
        [unix_target(str(tmp_path / "missing")), unix_target(str(tmp_path / "present"))]
    )
    things.append(proxy)
    client = proxy.client()
    things.append(client)
    for attempt in range(3):
        client.send(b"to the unix target %d" % attempt)
        data, sender = present.recvfrom(100)
        assert data == b"to the unix target %d" % attempt
        present.sendto(b"reply %d" % attempt, sender)
        assert client.recv(100) == b"reply %d" % attempt
    assert proxy.dropped("no_session") == 0


def test_a_full_unix_target_holds_datagrams_and_loses_none(
    things: list[Any], tmp_path: Path
) -> None:
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    things.append(slow)
    slow.bind(str(tmp_path / "slow"))
    proxy = DatagramProxy([unix_target(str(tmp_path / "slow"))])
    things.append(proxy)
    client = proxy.client()
    things.append(client)
    # Far more than a unix datagram queue holds (net.unix.max_dgram_qlen, 10 by default),
    # and few enough for the listener's receive buffer to keep while the proxy holds one.
    proxy.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    count = 200
    for number in range(count):
        client.send(number.to_bytes(4, "big") * 16)
    wait_until(lambda: proxy.row(DG_TO_TARGET) >= 10, DEADLINE, "the target's queue to fill")
    slow.settimeout(DEADLINE)
    for number in range(count):
        assert slow.recv(1024) == number.to_bytes(4, "big") * 16
    assert proxy.dropped("send_error") == 0


def test_draining_ends_quiet_sessions_and_reports_drained(things: list[Any]) -> None:
    target, proxy, client = echo_setup(things, timeout=8.0)  # lingers 1s
    client.send(b"ping")
    assert client.recv(100) == b"ping"
    proxy.runner.call(lambda: proxy.engine.stop_accepting(drain=True))
    wait_until(lambda: proxy.hooks.drained == 1, 60.0, "the drained hook")
    assert proxy.sessions() == 0 and proxy.mapping.held_total() == 0


def test_close_all_ends_every_session(things: list[Any]) -> None:
    target = EchoTarget()
    things.append(target)
    proxy = DatagramProxy([udp_target(target.port)])
    things.append(proxy)
    clients = [proxy.client() for _ in range(3)]
    things.extend(clients)
    for client in clients:
        client.send(b"x")
        assert client.recv(10) == b"x"
    proxy.runner.call(proxy.engine.close_all)
    assert proxy.sessions() == 0
    assert proxy.mapping.held_total() == 0 and proxy.row(DG_SESSIONS_ACTIVE) == 0
