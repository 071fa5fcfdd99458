"""The acceptor's guards: an exception while a client is taken in or held (queue mode)
refuses that client, gives back its one admission (global cap and per-source row alike)
exactly once, logs one warning and leaves the acceptor accepting; an admission mutex that
stays taken (its holder preempted) delays a client, never refuses it. Real sockets and a
real shared mapping; a stand-in for the worker around them."""

import asyncio
import logging
import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import uvloop

from forkproxy.relay import accepting
from forkproxy.relay.accepting import Acceptor
from forkproxy.relay.failpoints import Failpoint
from forkproxy.relay.internal_error import InternalErrors
from forkproxy.relay.plans import ListenerPlan
from forkproxy.relay.poller import Poller
from forkproxy.settings.address import parse_target
from forkproxy.settings.config import Config
from forkproxy.settings.options import ON_LIMIT_QUEUE, ON_LIMIT_REFUSE
from forkproxy.shared.admission import ADMITTED, _unlock
from forkproxy.shared.layout import WAITERS, WAITING
from forkproxy.shared.listener import Listener
from forkproxy.shared.per_source import source_key
from forkproxy.shared.scoreboard import ACCEPTED, REFUSED
from tests.support.forked import Child
from tests.support.shared_memory import make_shared

log = logging.getLogger("forkproxy")


class Stage:
    """An acceptor in a stand-in worker (slot 0 of a real mapping) on one listener."""

    def __init__(
        self,
        capacity: int,
        per_source: int = 0,
        queue: bool = False,
        failpoint: Failpoint | None = None,
    ) -> None:
        self.shared = make_shared(capacity, per_source=per_source)
        self.loop = uvloop.new_event_loop()
        self.poller = Poller(self.loop)
        sock = socket.create_server(("127.0.0.1", 0))
        sock.setblocking(False)
        self.address = sock.getsockname()
        self.listener = Listener(sock, "test", "127.0.0.1")
        self.connected: list[tuple[socket.socket, int]] = []  # what the connector got
        self.slot = self.shared.scoreboard.slot(0)
        config = Config(
            targets=(parse_target("127.0.0.1:9"),),
            connections_max=capacity,
            connections_max_per_source=per_source,
            on_limit=ON_LIMIT_QUEUE if queue else ON_LIMIT_REFUSE,
        )
        self.worker = SimpleNamespace(
            config=config,
            loop=self.loop,
            poller=self.poller,
            listeners=(self.listener,),
            admitter=self.shared.admission.admitter(0),
            slot=self.slot,
            spec=SimpleNamespace(events_fd=sock.fileno()),
            connector=SimpleNamespace(connect=self._connect, internal_errors=InternalErrors(log)),
            draining=False,
        )
        route = object()  # the connector's business: only passed on
        plan = ListenerPlan(self.listener, (), per_source, route)  # type: ignore[arg-type]
        plans = {self.listener.fd: plan}
        self.acceptor = Acceptor(self.worker, plans, failpoint)  # type: ignore[arg-type]
        self.acceptor.start()
        self.clients: list[socket.socket] = []

    def _connect(
        self, client: socket.socket, token: int, peer: object, route: object, counters: object
    ) -> None:
        self.connected.append((client, token))

    def client(self) -> socket.socket:
        """A client connected to the listener, then one accept batch."""
        client = socket.create_connection(self.address, timeout=5)
        self.clients.append(client)
        self.acceptor.on_listener_readable(self.listener)
        return client

    def in_use(self) -> tuple[int, int]:
        """(connections admitted, of them from 127.0.0.1) across the mapping."""
        admission = self.shared.admission
        key = source_key(socket.AF_INET, ("127.0.0.1", 1))
        assert key is not None
        return admission.in_use(), admission.source_in_use(key)

    def waiters(self) -> tuple[int, int]:
        """(the header's WAITERS, slot 0's WAITING)."""
        memory = memoryview(self.shared.mapping.memory)
        return int(memory[WAITERS : WAITERS + 4].cast("I")[0]), self.slot[WAITING]

    def close(self) -> None:
        if self.acceptor.waiter is not None:
            self.acceptor.waiter.stop()
        for client, _ in self.connected:
            client.close()
        for client in self.clients:
            client.close()
        self.acceptor.close()
        self.poller.close()
        self.loop.close()
        self.shared.close()


@pytest.fixture
def stages() -> Iterator[list[Stage]]:
    made: list[Stage] = []
    yield made
    for stage in made:
        stage.close()


def _end(client: socket.socket) -> str:
    """How the proxy ended `client`: "eof" or "reset"."""
    try:
        while client.recv(4096):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


def _internal_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]


@pytest.mark.parametrize("per_source", [0, 2], ids=["cap", "cap-and-per-source"])
def test_an_exception_taking_a_client_in_gives_its_admission_back_once(
    stages: list[Stage], caplog: pytest.LogCaptureFixture, per_source: int
) -> None:
    stage = Stage(2, per_source, failpoint=Failpoint("accept", 1))
    stages.append(stage)
    victim = stage.client()
    assert stage.connected == []
    assert stage.in_use() == (0, 0)  # the row too, with a per-source limit
    assert stage.slot[REFUSED] == 1 and stage.slot[ACCEPTED] == 0
    assert _end(victim) == "reset"
    (line,) = _internal_errors(caplog)
    assert "taking in the connection from 127.0.0.1:" in line and "InjectedFault" in line
    for _ in range(2):  # both units are there for the next clients
        stage.client()
    assert [token >= ADMITTED for _, token in stage.connected] == [True, True]
    assert stage.in_use() == (2, 2 if per_source else 0)


def test_an_exception_while_holding_a_client_refuses_it_and_stops_waiting(
    stages: list[Stage], caplog: pytest.LogCaptureFixture
) -> None:
    stage = Stage(1, queue=True)
    stages.append(stage)
    stage.client()
    assert len(stage.connected) == 1
    held = stage.client()
    assert stage.acceptor.held is not None and not stage.acceptor.accepting
    assert stage.waiters() == (1, 1)

    def broken_admit(key: bytes | None, limit: int) -> int:
        raise RuntimeError("admission broke")

    real = stage.acceptor.admitter
    stage.acceptor.admitter = SimpleNamespace(  # type: ignore[assignment]
        admit=broken_admit, capacity_seq=real.capacity_seq, wait_end=real.wait_end
    )
    stage.acceptor.on_capacity()  # as the helper thread's wake-up would
    assert stage.acceptor.held is None and stage.acceptor.accepting
    assert stage.waiters() == (0, 0)
    assert stage.slot[REFUSED] == 1 and stage.in_use() == (1, 0)
    assert _end(held) == "eof"
    (line,) = _internal_errors(caplog)
    assert "holding the connection from 127.0.0.1:" in line and "admission broke" in line


def test_a_hold_that_fails_before_waiting_leaves_the_waiters_alone(
    stages: list[Stage], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_thread(*args: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(accepting, "CapacityWaiter", no_thread)
    stage = Stage(1, queue=True)
    stages.append(stage)
    stage.client()
    held = stage.client()
    assert stage.acceptor.held is None and stage.acceptor.accepting
    assert stage.waiters() == (0, 0)  # never counted, so never taken out: no wrap-around
    assert stage.slot[REFUSED] == 1 and stage.in_use() == (1, 0)
    assert _end(held) == "eof"
    (line,) = _internal_errors(caplog)
    assert "holding the connection from 127.0.0.1:" in line


@pytest.mark.parametrize("queue", [False, True], ids=["refuse", "queue"])
def test_a_busy_admission_lock_delays_a_client_and_never_refuses_it(
    stages: list[Stage], queue: bool
) -> None:
    """Another process holds the admission mutex past the wait budget, as a holder
    preempted on a loaded host does: no cap turned the client away, so it is kept (with
    the request it sent), the next clients wait in the backlog, and it is admitted once the
    mutex is free. Refused, it would be closed with its request unread: an RST."""
    stage = Stage(4, queue=queue)
    stages.append(stage)
    admission = stage.shared.admission
    holder = Child(
        lambda: int(admission.admitter(1)._lock()),
        then=lambda: _unlock(admission.mutex_address),
    )
    holder.start()
    try:
        assert holder.result() == 1
        first = socket.create_connection(stage.address, timeout=5)
        stage.clients.append(first)
        first.sendall(b"request")
        stage.acceptor.on_listener_readable(stage.listener)  # admit() finds it busy
        assert stage.connected == [] and stage.slot[REFUSED] == 0
        assert stage.acceptor.held is not None and not stage.acceptor.accepting
        first.setblocking(False)
        with pytest.raises(BlockingIOError):  # open: neither reset nor closed
            first.recv(1)
        second = stage.client()  # left in the backlog meanwhile
        assert stage.connected == []
    finally:
        holder.finish()  # unlocks and exits
    both: asyncio.Future[None] = stage.loop.create_future()
    connect = stage.acceptor.connect

    def on_connect(
        client: socket.socket, token: int, peer: object, route: object, counters: object
    ) -> None:
        connect(client, token, peer, route, counters)
        if len(stage.connected) == 2:
            both.set_result(None)

    stage.acceptor.connect = on_connect
    # The retry admits the held client, then accepting resumes and takes the next one.
    stage.loop.run_until_complete(asyncio.wait_for(both, 10))
    (held, held_token), (waited, _) = stage.connected
    assert held_token == ADMITTED and held.getpeername() == first.getsockname()
    assert held.recv(16) == b"request"
    assert waited.getpeername() == second.getsockname()
    assert stage.acceptor.held is None and stage.acceptor.accepting
    assert stage.slot[REFUSED] == 0 and stage.slot[ACCEPTED] == 2
    assert stage.in_use() == (2, 0)
