"""What a reload does to the listeners it takes over: an address still named keeps its
socket, a new one is bound, a dropped one is closed only when told; nothing changes if an
address cannot be bound; a reload given up puts them back."""

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkproxy.errors import ForkproxyError
from forkproxy.settings.arguments import parse_args
from forkproxy.settings.config import Config
from forkproxy.supervisor.resources import Resources
from tests.support.proxy import free_port


def _config(*listen: str, metrics: str | None = None) -> Config:
    argv = [f"--listen={address}" for address in listen]
    if metrics is not None:
        argv.append(f"--metrics={metrics}")
    return parse_args([*argv, "127.0.0.1:1"])


@pytest.fixture
def resources() -> Iterator[Resources]:
    made = Resources()
    yield made
    made.close()


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as client:
        try:
            client.connect(str(path))
        except OSError:
            return False
    return True


def test_kept_added_and_dropped(workdir: Path, resources: Resources) -> None:
    a, b, c = (workdir / name for name in ("a.sock", "b.sock", "c.sock"))
    resources.open(_config(f"one={a}", str(b)), [])
    assert resources.owns_listeners
    one, other = resources.listeners
    resources.apply(_config(f"renamed={a}", str(c)))
    kept, added = resources.listeners
    assert kept.sock is one.sock and kept.name == "renamed"  # not re-bound: the same socket
    assert added.label == str(c) and _accepts(c)
    assert resources.retiring == [other]
    assert _accepts(b)  # still open: the old workers accept on it until told to drain
    resources.close_retiring()
    assert not b.exists() and other.sock.fileno() == -1
    assert [listener.sock for listener in resources.listeners] == [one.sock, added.sock]


def test_nothing_changes_if_an_address_cannot_be_bound(workdir: Path, resources: Resources) -> None:
    a, b, taken = workdir / "a.sock", workdir / "b.sock", workdir / "taken"
    taken.write_text("not a socket")
    resources.open(_config(str(a)), [])
    before = list(resources.listeners)
    with pytest.raises(ForkproxyError, match="exists and is not a socket"):
        resources.apply(_config(str(a), str(b), str(taken)))
    assert resources.listeners == before and resources.retiring == []
    assert not b.exists()  # bound during the attempt, then closed and removed


def test_a_reload_given_up_puts_the_listeners_back(workdir: Path, resources: Resources) -> None:
    a, b = workdir / "a.sock", workdir / "b.sock"
    resources.open(_config(str(a)), [])
    before = list(resources.listeners)
    resources.apply(_config(str(b)))
    assert resources.retiring == before
    resources.revert()
    assert resources.listeners == before and _accepts(a)
    assert not b.exists()  # the one the reload added is gone
    assert resources.planned(_config(str(a))) == [("", str(a), socket.SOCK_STREAM)]


def test_planned_names_and_labels(workdir: Path, resources: Resources) -> None:
    a = workdir / "a.sock"
    resources.open(_config(str(a)), [])
    port = free_port()
    dns = free_port()
    assert resources.planned(
        _config(f"web={a}", f"api=127.0.0.1:{port}", f"dns=udp:127.0.0.1:{dns}")
    ) == [
        ("web", str(a), socket.SOCK_STREAM),
        ("api", f"127.0.0.1:{port}", socket.SOCK_STREAM),
        ("dns", f"udp:127.0.0.1:{dns}", socket.SOCK_DGRAM),
    ]


def test_passed_listeners_stay_whatever_listen_says(resources: Resources) -> None:
    passed = socket.create_server(("127.0.0.1", 0))
    fd = os.dup(passed.fileno())
    passed.close()
    resources.open(_config(), [(fd, "web")])
    assert not resources.owns_listeners
    before = list(resources.listeners)
    resources.apply(_config(f"127.0.0.1:{free_port()}"))
    assert resources.listeners == before and resources.retiring == []
    assert resources.planned(_config()) == [("web", before[0].label, socket.SOCK_STREAM)]


def test_metrics_address_changes_at_once(workdir: Path, resources: Resources) -> None:
    first, second = workdir / "m1.sock", workdir / "m2.sock"
    a = workdir / "a.sock"
    resources.open(_config(str(a), metrics=str(first)), [])
    (old,) = resources.metrics_listeners
    resources.apply(_config(str(a), metrics=str(first)))
    assert resources.metrics_listeners == [old]  # the same address: the same socket
    resources.apply(_config(str(a), metrics=str(second)))
    (new,) = resources.metrics_listeners
    assert new.label == str(second) and not first.exists() and old.sock.fileno() == -1
    resources.apply(_config(str(a)))
    assert resources.metrics_listeners == [] and not second.exists()


def test_a_datagram_listener_added(resources: Resources) -> None:
    """A reload adding a UDP listener binds it as one, keeps the TCP one, and the
    scoreboard's listener rows cover both."""
    port, dns = free_port(), free_port()
    resources.open(_config(f"web=127.0.0.1:{port}"), [])
    resources.create_shared(_config(f"web=127.0.0.1:{port}"))
    assert resources.scoreboard is not None and resources.scoreboard.listener_rows == 1
    (web,) = resources.listeners
    resources.apply(_config(f"web=127.0.0.1:{port}", f"dns=udp:127.0.0.1:{dns}"))
    kept, added = resources.listeners
    assert kept.sock is web.sock and resources.retiring == []
    assert added.is_datagram and added.sock.getsockname() == ("127.0.0.1", dns)
    assert resources.scoreboard.listener_rows == 2
