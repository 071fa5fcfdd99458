"""The start-up line: every listener and its targets, bounded for huge configurations."""

import socket

import pytest

from forkproxy.settings.address import parse_target
from forkproxy.shared.listener import Listener
from forkproxy.supervisor.routes import ROUTES_BUDGET, bounded_list, startup_line


def _listener(name: str, label: str) -> Listener:
    return Listener(socket.socket(), name, label)


@pytest.fixture
def sockets() -> list[Listener]:
    made: list[Listener] = []
    yield made
    for listener in made:
        listener.sock.close()


def test_every_route_with_names_and_addresses(sockets: list[Listener]) -> None:
    sockets += [
        _listener("web", "fd 3 'web' (127.0.0.1:80)"),
        _listener("api", "127.0.0.1:81"),
        _listener("", "/run/app.sock"),
    ]
    routes = [
        (sockets[0], [parse_target("127.0.0.1:9001"), parse_target("[::1]:9002")]),
        (sockets[1], [parse_target("/run/api.sock")]),
        (sockets[2], [parse_target("@app")]),
    ]
    assert startup_line(routes, 4, 256) == (
        "relaying fd 3 'web' (127.0.0.1:80) -> 127.0.0.1:9001, [::1]:9002; "
        "'api' 127.0.0.1:81 -> /run/api.sock; /run/app.sock -> @app "
        "with 4 workers, at most 256 connections"
    )
    assert startup_line(routes[2:], 1, 1).endswith(" with 1 worker, at most 1 connections")


def test_a_huge_configuration_is_counted_past_the_budget(sockets: list[Listener]) -> None:
    sockets += [_listener(f"l{index}", f"127.0.0.1:{10000 + index}") for index in range(500)]
    many_targets = [
        parse_target(f"10.0.{index // 250}.{index % 250 + 1}:80") for index in range(300)
    ]
    routes = [(listener, many_targets) for listener in sockets]
    line = startup_line(routes, 2, 256)
    assert len(line) < ROUTES_BUDGET + 300
    assert line.startswith("relaying 'l0' 127.0.0.1:10000 -> 10.0.0.1:80, 10.0.0.2:80, ")
    shown = line.count(" -> ")
    assert 1 <= shown < 500
    assert "10.0.1.50:80" not in line  # each listener's targets are bounded too
    assert line.endswith(f" and {500 - shown} more with 2 workers, at most 256 connections")


@pytest.mark.parametrize(
    ("items", "budget", "expected"),
    [
        ([], 10, ""),
        (["a"], 0, "a"),  # the first is always shown whole
        (["aaaa", "bbbb", "cccc"], 100, "aaaa, bbbb, cccc"),
        (["aaaa", "bbbb", "cccc"], 10, "aaaa, bbbb and 1 more"),
        (["aaaa", "bbbb", "cccc"], 9, "aaaa and 2 more"),
    ],
)
def test_bounded_list(items: list[str], budget: int, expected: str) -> None:
    assert bounded_list(items, ", ", budget) == expected
