"""Each listener's plan from its settings: routes and target groups shared where equal."""

import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from forkproxy.relay.plans import ListenerPlan, make_plans, min_connect_timeout
from forkproxy.relay.splice import Direction, IdleDirection, PipePool
from forkproxy.settings.address import parse_target
from forkproxy.settings.config import Config, ListenerSettings
from forkproxy.shared.listener import Listener


def _targets(*texts: str) -> tuple:
    return tuple(parse_target(text) for text in texts)


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[list[Listener]]:
    made = []
    for name in ("web", "api", "api2", "", "other"):
        made.append(Listener(socket.create_server(("127.0.0.1", 0)), name, name or "unnamed"))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "u.sock"))
    unix.listen()
    made.append(Listener(unix, "unix", "unix"))
    yield made
    for listener in made:
        listener.sock.close()


def _connector() -> SimpleNamespace:
    return SimpleNamespace(
        loop=SimpleNamespace(call_later=lambda delay, callback: None),
        on_target_failed=lambda target, error, newly: None,
        on_relay_closed=lambda relay: None,
        crashed=lambda relay, error: None,
    )


CONFIG = Config(
    targets=_targets("d:1"),
    nodelay=True,
    listeners=(
        ListenerSettings(
            "web",
            _targets("w:1", "w:2"),
            proxy_protocol=2,
            idle_timeout=300.0,
            pipe_size=65536,
            connections_max_per_source=3,
            connect_timeout=2.0,
        ),
        ListenerSettings("api", _targets("a:1")),
        ListenerSettings("api2", _targets("a:1"), proxy_protocol=1),
        ListenerSettings("unix", _targets("a:1"), nodelay=False),
    ),
)


def _plans(listeners: list[Listener]) -> tuple[dict[str, ListenerPlan], dict]:
    pools: dict[int, PipePool] = {}
    plans = make_plans(listeners, CONFIG, _connector(), pools)  # type: ignore[arg-type]
    return {listener.name: plans[listener.fd] for listener in listeners}, pools


def test_each_listener_gets_its_settings(listeners: list[Listener]) -> None:
    plans, pools = _plans(listeners)
    web, api, api2, unnamed, other, unix = (
        plans[name] for name in ("web", "api", "api2", "", "other", "unix")
    )
    assert [t.text for t in web.route.group.targets] == ["w:1", "w:2"]
    assert web.route.group.timeout == 2.0
    assert web.route.proxy_header is not None and api.route.proxy_header is None
    assert (web.route.direction, api.route.direction) == (IdleDirection, Direction)
    assert web.route.idle_sweep is not None and api.route.idle_sweep is None
    assert (web.source_limit, api.source_limit, unnamed.source_limit) == (3, 0, 0)
    assert [t.text for t in unnamed.route.group.targets] == ["d:1"]
    # Listeners without settings share the global route: one round-robin, one pool.
    assert unnamed.route is other.route
    assert set(pools) == {65536, 256 * 1024}
    assert web.route.pool is pools[65536] and api.route.pool is pools[256 * 1024]
    # Same targets, timeout and TCP options: one group, whatever the PROXY header.
    assert api.route is not api2.route and api.route.group is api2.route.group
    assert unix.route.group is not api.route.group  # nodelay differs
    assert unix.client_options == ()  # no TCP options on a unix client
    assert web.client_options and web.client_options == web.route.group.options


def test_the_connect_sweep_follows_the_shortest_timeout(listeners: list[Listener]) -> None:
    assert min_connect_timeout(listeners, CONFIG) == 2.0
    assert min_connect_timeout(listeners[3:4], CONFIG) == CONFIG.connect_timeout


class _IdleRelay:
    """What the idle sweep looks at in a relay; `fail` raises if given an exception."""

    def __init__(self, raises: Exception | None = None) -> None:
        self.active = False
        self.quiet_since = 0.0
        self.closed = False
        self.raises = raises
        self.failed: list[OSError] = []

    def fail(self, error: OSError) -> None:
        self.failed.append(error)
        if self.raises is not None:
            raise self.raises


def test_an_exception_in_a_listeners_idle_sweep_goes_to_the_connector(
    listeners: list[Listener],
) -> None:
    crashed: list[tuple[object, Exception]] = []
    connector = _connector()
    connector.crashed = lambda relay, error: crashed.append((relay, error))
    plans = make_plans(listeners, CONFIG, connector, {})  # type: ignore[arg-type]
    route = plans[listeners[0].fd].route  # web: --idle-timeout 300
    assert route.idle_sweep is not None
    broken = _IdleRelay(RuntimeError("fail broke"))
    other = _IdleRelay()
    route.idle_relays.update((broken, other))  # type: ignore[arg-type]
    route.idle_sweep.sweep(1000.0)  # both idle past 300s: one fault stops neither
    assert crashed == [(broken, broken.raises)]
    assert len(broken.failed) == len(other.failed) == 1
