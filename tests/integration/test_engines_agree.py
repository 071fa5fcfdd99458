"""Both relay engines, driven by the same random sequences of writes, half-closes, resets
and slow or stalled readers on each side, relay the same bytes and end each side the same
way, and that is what was sent: every byte in order, a half-close as an EOF after the last
byte, a reset as a reset.

A forkproxy per engine relays to a listener of the test's own, so the test holds both
peers of each relayed connection. One thread drives both peers with non-blocking sockets:
after each step it waits until what the step sent has arrived wherever the reader is not
stalled; a stalled reader's writer keeps what the proxy does not take (backpressure) until
the reader resumes. A reset comes last and only once everything sent has arrived, so what
each peer sees does not depend on timing.
"""

import contextlib
import random
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.proxy import run_proxy

pytestmark = pytest.mark.engines("c")  # this test runs both engines itself

DEADLINE = 20.0
CLIENT, TARGET = 0, 1
EOF, RESET = "eof", "reset"
LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass
class Peer:
    """One end of a relayed connection: what it sent and received, how its input ended."""

    sock: socket.socket
    read_size: int  # a slow reader reads a few bytes per round
    paused: bool = False  # a stalled reader does not read at all
    pending: bytearray = field(default_factory=bytearray)
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)
    end: str | None = None  # EOF or RESET, once read
    shutdown_wanted: bool = False
    shut: bool = False
    gone: bool = False

    def pump(self, readable: bool, writable: bool) -> None:
        if readable and self.end is None:
            try:
                data = self.sock.recv(self.read_size)
            except BlockingIOError:
                data = None
            except ConnectionResetError:
                self.end = RESET
                data = None
            if data == b"":
                self.end = EOF
            elif data:
                self.received += data
        if writable and self.pending:
            try:
                count = self.sock.send(self.pending)
            except BlockingIOError:
                count = 0
            del self.pending[:count]
            self.sent += count
        if self.shutdown_wanted and not self.pending and not self.shut:
            self.sock.shutdown(socket.SHUT_WR)
            self.shut = True


class Connection:
    """A client and the target's end of its relayed connection."""

    def __init__(self, proxy_address: object, listener: socket.socket, sizes: tuple[int, int]):
        client = socket.create_connection(proxy_address, timeout=DEADLINE)  # type: ignore[arg-type]
        target, _ = listener.accept()
        self.peers = (Peer(client, sizes[0]), Peer(target, sizes[1]))
        for peer in self.peers:
            peer.sock.setblocking(False)

    def round(self) -> None:
        poll = select.poll()
        for peer in self.peers:
            if peer.gone:
                continue
            events = (select.POLLIN if not peer.paused and peer.end is None else 0) | (
                select.POLLOUT if peer.pending else 0
            )
            if events:
                poll.register(peer.sock, events)
        ready = dict(poll.poll(20))
        for peer in self.peers:
            if not peer.gone:
                mask = ready.get(peer.sock.fileno(), 0)
                readable = bool(mask & (select.POLLIN | select.POLLERR | select.POLLHUP))
                peer.pump(readable, bool(mask & (select.POLLOUT | select.POLLERR)))

    def settled(self) -> bool:
        """What was sent has arrived, but towards a stalled reader."""
        for writer, reader in (self.peers, self.peers[::-1]):
            if reader.paused or reader.gone:
                continue
            if writer.pending or writer.shutdown_wanted and not writer.shut:
                return False
            if reader.end is None and len(reader.received) < writer.sent:
                return False
            if writer.shut and reader.end is None:
                return False
        return True

    def settle(self) -> None:
        self.run_until(self.settled, "the relay to settle")

    def run_until(self, condition: Callable[[], bool], what: str) -> None:
        """Rounds (each waits for readiness, at most 20 ms) until `condition` holds."""
        deadline = time.monotonic() + DEADLINE
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {DEADLINE}s waiting for {what}")
            self.round()

    def close(self) -> None:
        for peer in self.peers:
            peer.sock.close()


# A step: (side, action, size).
WRITE, SHUTDOWN, PAUSE, RESUME = "write", "shutdown", "pause", "resume"
steps = st.lists(
    st.tuples(
        st.sampled_from([CLIENT, TARGET]),
        st.sampled_from([WRITE, WRITE, WRITE, SHUTDOWN, PAUSE, RESUME]),
        st.sampled_from([1, 100, 4096, 70_000, 300_000]),
    ),
    max_size=12,
)
scenarios = st.tuples(
    steps,
    st.sampled_from([None, CLIENT, TARGET]),  # who resets at the end, if anyone
    st.tuples(st.sampled_from([509, 65536]), st.sampled_from([509, 65536])),  # read sizes
    st.integers(0, 2**32),  # the bytes' seed
)

Observation = tuple[bytes, str | None, bytes, str | None]
Relays = list[tuple[object, socket.socket]]


def run_scenario(
    proxy_address: object, listener: socket.socket, scenario: tuple
) -> tuple[Observation, tuple[bytes, bytes]]:
    """Drive one connection; what each peer read and how its input ended, and what each
    peer sent."""
    step_list, resetter, sizes, seed = scenario
    generator = random.Random(seed)
    written = (bytearray(), bytearray())
    connection = Connection(proxy_address, listener, sizes)
    peers = connection.peers
    try:
        for side, action, size in step_list:
            peer = peers[side]
            if action == WRITE and not peer.shutdown_wanted:
                data = generator.randbytes(size)
                peer.pending += data
                written[side].extend(data)
            elif action == SHUTDOWN:
                peer.shutdown_wanted = True
            elif action in (PAUSE, RESUME):
                peer.paused = action == PAUSE
            connection.settle()
        for peer in peers:
            peer.paused = False
        if resetter is None:
            for peer in peers:
                peer.shutdown_wanted = True
            connection.settle()
        else:
            connection.settle()
            gone = peers[resetter]
            gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            gone.sock.close()
            gone.gone = True
            other = peers[1 - resetter]
            connection.run_until(lambda: other.end is not None, "the reset")
    finally:
        connection.close()
    client, target = peers
    observed = (bytes(client.received), client.end, bytes(target.received), target.end)
    return observed, (bytes(written[CLIENT]), bytes(written[TARGET]))


def expected(scenario: tuple, written: tuple[bytes, bytes]) -> Observation:
    """What a faithful relay shows each peer."""
    step_list, resetter, _, _ = scenario
    shut = [any(s == side and a == SHUTDOWN for s, a, _ in step_list) for side in (0, 1)]
    ends: list[str | None] = [None, None]
    for side in (CLIENT, TARGET):
        writer = 1 - side
        if resetter is None or shut[writer]:
            ends[side] = EOF
        elif resetter == writer:
            ends[side] = RESET
        # The resetter's own input: open, unless its peer had shut down before.
    return (written[TARGET], ends[CLIENT], written[CLIENT], ends[TARGET])


@pytest.fixture(scope="module")
def relays(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[tuple[object, socket.socket]]]:
    """A forkproxy per engine (c, then python), each with the listener it relays to."""
    workdir = Path(tmp_path_factory.mktemp("engines"))
    with contextlib.ExitStack() as stack:
        relays = []
        for engine in ("c", "python"):
            listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
            listener.settimeout(DEADLINE)
            target = f"127.0.0.1:{listener.getsockname()[1]}"
            env = {"FORKPROXY_ENGINE": engine}
            proxy = stack.enter_context(run_proxy(["-w", "1", target], workdir, env=env))
            relays.append((proxy.address(), listener))
        yield relays


@pytest.mark.timeout(900)  # a few seconds per example, more under a sanitizer
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios)
def test_both_engines_relay_what_was_sent_and_end_alike(relays: Relays, scenario: tuple) -> None:
    results = [run_scenario(address, listener, scenario) for address, listener in relays]
    (compiled, written), (reference, written_again) = results
    assert written == written_again
    assert compiled == reference
    assert compiled == expected(scenario, written)


def test_a_reset_is_read_as_a_reset(relays: Relays) -> None:
    """The driver itself: an abort is read as a reset, not as a clean EOF."""
    scenario = ([(CLIENT, WRITE, 100)], CLIENT, (65536, 65536), 1)
    for address, listener in relays:
        observed, written = run_scenario(address, listener, scenario)
        assert observed == (b"", None, written[CLIENT], RESET)
