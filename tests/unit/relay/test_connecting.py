"""The connector's guards: whatever fails on the way from an admitted client to a relay,
the client is closed and its admission returned exactly once. Real sockets and a real
loop; a stand-in for the worker around them."""

import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import uvloop

from forkproxy.relay.connecting import Connector
from forkproxy.relay.failpoints import Failpoint
from forkproxy.relay.pipes import PipePool
from forkproxy.relay.plans import make_plans
from forkproxy.relay.poller import Poller
from forkproxy.settings.address import parse_target
from forkproxy.settings.config import Config
from forkproxy.shared.admission import ADMITTED
from forkproxy.shared.listener import Listener
from forkproxy.shared.scoreboard import CONNECT_ERRORS, SLOT_WORDS

# The admission the client holds, which the connector must give back once: ADMITTED (no
# per-source limit, the usual case) or a per-source row.
TOKENS = (ADMITTED, 7)


class Stage:
    """A connector in a stand-in worker, a target listening, and one admitted client."""

    def __init__(
        self, failpoint: Failpoint | None = None, proxy_protocol: int = 0, token: int = ADMITTED
    ) -> None:
        self.token = token
        self.loop = uvloop.new_event_loop()
        self.server = socket.create_server(("127.0.0.1", 0))
        target = parse_target(f"127.0.0.1:{self.server.getsockname()[1]}")
        self.ended: list[int] = []
        self.slot = memoryview(bytearray(SLOT_WORDS * 8)).cast("q")
        self.pools: dict[int, PipePool] = {}
        listener = socket.create_server(("127.0.0.1", 0))
        config = Config(targets=(target,), proxy_protocol=proxy_protocol)
        self.worker = SimpleNamespace(
            config=config,
            loop=self.loop,
            listeners=(Listener(listener, "", "127.0.0.1"),),
            slot=self.slot,
            draining=False,
            connection_ended=self.ended.append,
        )
        self.worker.poller = self.poller = Poller(self.loop, self._on_callback_error)
        self.connector = Connector(self.worker, failpoint)  # type: ignore[arg-type]
        plans = make_plans(self.worker.listeners, config, self.connector, self.pools)
        self.route = plans[listener.fileno()].route
        self.client_app = socket.create_connection(listener.getsockname(), timeout=5)
        self.client, peer = listener.accept()
        listener.close()
        self.client.setblocking(False)
        self.peer = peer

    def _on_callback_error(self, fd: int, error: Exception) -> None:
        owner = self.connector.owner_of(fd)
        assert owner is not None, f"no connection owns fd {fd}"
        self.connector.crashed(owner, error)

    def connect(self) -> None:
        self.connector.connect(self.client, self.token, self.peer, self.route)

    def turns(self, count: int = 5) -> None:
        for _ in range(count):
            self.loop.run_until_complete(self._turn())

    async def _turn(self) -> None:
        future = self.loop.create_future()
        self.loop.call_soon(future.set_result, None)
        await future

    def client_end(self) -> str:
        """How the client app's connection ends: "eof" or "reset"."""
        try:
            while self.client_app.recv(4096):
                pass
        except ConnectionResetError:
            return "reset"
        return "eof"

    def close(self) -> None:
        self.connector.close_all()
        self.poller.close()
        for pool in self.pools.values():
            pool.close()
        self.loop.close()
        self.client_app.close()
        self.server.close()


@pytest.fixture
def stages() -> Iterator[list[Stage]]:
    made: list[Stage] = []
    yield made
    for stage in made:
        stage.close()


def test_a_proxy_header_that_cannot_be_made_fails_the_connect(stages: list[Stage]) -> None:
    stage = Stage(proxy_protocol=1)
    stages.append(stage)

    def broken_encoder(client: object, local: object, family: int) -> bytes:
        raise ValueError("invalid IPv4 address 'x'")

    stage.route.proxy_header = broken_encoder
    stage.connect()
    stage.turns()
    assert stage.ended == [stage.token]
    assert stage.slot[CONNECT_ERRORS] == 1
    assert not stage.connector.pending and not stage.connector.relays
    assert stage.client.fileno() == -1 and stage.client_end() == "eof"


@pytest.mark.parametrize("token", TOKENS)
@pytest.mark.parametrize("where", ["connected", "readable"])
def test_an_exception_on_the_way_to_a_relay_releases_the_connection_once(
    stages: list[Stage], where: str, token: int
) -> None:
    stage = Stage(failpoint=Failpoint(where, 1), token=token)
    stages.append(stage)
    stage.client_app.sendall(b"first bytes")  # the readable event the failpoint waits for
    stage.connect()
    stage.turns()
    target_app, _ = stage.server.accept()
    with target_app:
        assert stage.ended == [stage.token]
        assert not stage.connector.pending and not stage.connector.relays
        assert stage.poller.watching() == 0
        assert stage.client_end() == "reset"  # aborted: an RST to both peers
        target_app.settimeout(5)
        with pytest.raises(ConnectionResetError):
            target_app.recv(4096)
    stage.connector.close_all()  # nothing left to release: nothing is released twice
    assert stage.ended == [stage.token]


@pytest.mark.parametrize("token", TOKENS)
def test_a_connect_failure_is_not_released_twice(stages: list[Stage], token: int) -> None:
    stage = Stage(token=token)
    stages.append(stage)
    stage.server.close()  # nothing listens: the connect is refused
    stage.connect()
    stage.turns()
    assert stage.ended == [stage.token]
    assert stage.slot[CONNECT_ERRORS] == 1
    assert stage.client_end() == "eof"  # a failed connect is a plain close
    stage.connector.close_all()
    assert stage.ended == [stage.token]
