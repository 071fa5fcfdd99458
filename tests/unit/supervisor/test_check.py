"""--check: listeners against the routes, targets resolved, one line per route."""

import pytest

from forkproxy.errors import UsageErrors
from forkproxy.settings.arguments import parse_args
from forkproxy.settings.kinds import DATAGRAM, STREAM
from forkproxy.supervisor.check import check_settings, listener_problems

NO_SOCKETS: dict[str, str] = {}


def test_a_route_naming_no_listener() -> None:
    config = parse_args(["--route=admin=h:1", "d:1"])
    listeners = [
        ("web", "fd 3 'web'", STREAM),
        ("api", "fd 4 'api'", STREAM),
        ("other", "fd 5", STREAM),
        ("", "fd 6", STREAM),
    ]
    assert listener_problems(config, listeners) == [
        "--route=admin=...: no listening socket is named 'admin' (named: 'api', 'other', "
        "'web'; name them with FileDescriptorName= or --listen NAME=ADDR)"
    ]
    assert listener_problems(parse_args(["--route=web=h:1", "d:1"]), listeners) == []


def test_a_listener_without_a_target() -> None:
    config = parse_args(["--route=web=h:1", "--listen=web=127.0.0.1:1", "--listen=127.0.0.1:2"])
    assert config.targets == ()
    listeners = [("web", "'web'", STREAM), ("", "127.0.0.1:2", STREAM)]
    assert listener_problems(config, listeners) == [
        "127.0.0.1:2: no target for this listener: give targets (or a [listeners.NAME] "
        "section naming it) in the configuration file, or as arguments"
    ]


def test_listeners_whose_targets_are_of_another_kind() -> None:
    config = parse_args(["--route=dns=udp:127.0.0.1:53", "127.0.0.1:80"])
    listeners = [
        ("dns", "fd 3 'dns'", DATAGRAM),
        ("", "fd 4", DATAGRAM),
        ("web", "fd 5 'web'", STREAM),
    ]
    assert listener_problems(config, listeners) == [
        "cannot relay listener fd 4: it receives datagrams but target '127.0.0.1:80' is a "
        "stream target (write udp:HOST:PORT, unix-dgram:/path or unix-dgram:@name)"
    ]
    listeners = [("dns", "fd 3 'dns'", STREAM)]
    assert listener_problems(config, listeners) == [
        "cannot relay listener fd 3 'dns' (--route=dns=...): it receives stream connections "
        "but target 'udp:127.0.0.1:53' is a datagram target (write HOST:PORT, /path or @name)"
    ]


def test_routes_of_the_listen_addresses() -> None:
    argv = ["-l", "8080", "-l", "web=127.0.0.1:81", "--route=web=127.0.0.1:9"]
    argv += ["--idle-timeout=5min", "--no-nodelay", "--keepalive", "127.0.0.1:80"]
    assert check_settings(parse_args(argv), NO_SOCKETS) == [
        "8080 -> 127.0.0.1:80  (idle-timeout=5min, keepalive=true, nodelay=false)",
        "'web' 127.0.0.1:81 -> 127.0.0.1:9  (idle-timeout=5min, keepalive=true, nodelay=false)",
    ]


def test_routes_by_name_without_listeners() -> None:
    config = parse_args(["--route=web=/run/web.sock", "-pv2", "127.0.0.1:80"])
    assert check_settings(config, NO_SOCKETS) == [
        "'web' -> /run/web.sock  (proxy-protocol=v2)",
        "other listeners -> 127.0.0.1:80  (proxy-protocol=v2)",
    ]
    assert check_settings(parse_args(["127.0.0.1:80"]), NO_SOCKETS) == [
        "every listener -> 127.0.0.1:80"
    ]


def test_balancing_options_and_backups() -> None:
    argv = ["--balance=source", "--backup=127.0.0.1:8", "--backup=/run/b.sock"]
    config = parse_args([*argv, "--connect-retry=5s", "127.0.0.1:80"])
    assert check_settings(config, NO_SOCKETS) == [
        "every listener -> 127.0.0.1:80  (balance=source, "
        "backup=127.0.0.1:8,/run/b.sock, connect-retry=5s)"
    ]


def test_every_problem_at_once() -> None:
    config = parse_args(
        ["-l", "web=127.0.0.1:81", "--route=api=bad.invalid:80", "localhost:80", "nope.invalid"]
    )
    with pytest.raises(UsageErrors) as raised:
        check_settings(config, NO_SOCKETS)
    assert raised.value.messages[0].startswith("--route=api=...: no listening socket is named")
    # The reason is the resolver's ("Name or service not known" where DNS answers).
    resolving = [message.partition(": ")[0] for message in raised.value.messages[1:]]
    assert resolving == [
        "cannot resolve target 'nope.invalid'",
        "cannot resolve target 'bad.invalid:80'",
    ]
