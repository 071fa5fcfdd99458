"""The relay options on the command line: spellings, defaults, getopt's optional values."""

import math

import pytest

from forkproxy.errors import UsageError
from forkproxy.settings.address import parse_target
from forkproxy.settings.arguments import parse_args
from forkproxy.settings.config import DEFAULT_NODELAY, DEFAULT_PIPE_SIZE, Config, ListenerSettings
from forkproxy.settings.options import KeepAlive


def test_defaults() -> None:
    config = parse_args(["127.0.0.1:80"])
    assert config.proxy_protocol == 0
    assert config.connect_timeout == 10.0
    assert math.isinf(config.idle_timeout)
    assert config.keepalive is None
    assert config.nodelay is DEFAULT_NODELAY
    assert config.pipe_size == DEFAULT_PIPE_SIZE
    assert config.on_limit == "refuse"
    assert config.connections_max_per_source == 0
    assert config.listeners == ()


@pytest.mark.parametrize(
    ("argv", "version", "targets"),
    [
        (["-p", "h:1"], 1, ["h:1"]),  # bare -p: v1, and h:1 stays the target
        (["h:1", "-p"], 1, ["h:1"]),
        (["--proxy-protocol", "h:1"], 1, ["h:1"]),
        (["--proxy-protocol=v2", "h:1"], 2, ["h:1"]),
        (["--proxy-protocol=V1", "h:1"], 1, ["h:1"]),
        (["-pv2", "h:1"], 2, ["h:1"]),
        (["-p", "v2:80", "h:1"], 1, ["v2:80", "h:1"]),  # a host named v2, with its port
        (["-p", "vhost", "h:1"], 1, ["vhost", "h:1"]),
        (["-p", "--", "h:1"], 1, ["h:1"]),
        # systemd-socket-proxyd's own --proxy-protocol, so getopt_long's prefixes of it
        (["--proxy=v2", "h:1"], 2, ["h:1"]),
        (["--proxy", "h:1"], 1, ["h:1"]),
    ],
)
def test_proxy_protocol_spellings(argv: list[str], version: int, targets: list[str]) -> None:
    config = parse_args(argv)
    assert config.proxy_protocol == version
    assert [target.text for target in config.targets] == targets


@pytest.mark.parametrize(
    ("argv", "keepalive", "targets"),
    [
        (["--keepalive", "h:1"], KeepAlive(), ["h:1"]),
        (["--keepalive", "/run/a,b.sock"], KeepAlive(), ["/run/a,b.sock"]),
        (["--keepalive", "[::1]:80"], KeepAlive(), ["[::1]:80"]),
        (["--keepalive=60s,10s,6", "h:1"], KeepAlive(60, 10, 6), ["h:1"]),
        (["h:1", "--keepalive"], KeepAlive(), ["h:1"]),
        (["--keepalive", "5m:80"], KeepAlive(), ["5m:80"]),
    ],
)
def test_keepalive_spellings(argv: list[str], keepalive: KeepAlive, targets: list[str]) -> None:
    config = parse_args(argv)
    assert config.keepalive == keepalive
    assert [target.text for target in config.targets] == targets


def test_every_option() -> None:
    config = parse_args(
        [
            "--proxy-protocol=v2",
            "--connect-timeout=2s 500ms",
            "--idle-timeout=5min",
            "--keepalive=1min,10,6",
            "--no-nodelay",
            "--pipe-size=128K",
            "--on-limit=queue",
            "--connections-max-per-source=8",
            "--route=web=/run/web.sock",
            "--route",
            "api=[::1]:8080",
            "--route=web=@web2",
            "a:1",
            "vsock:3:1024",
        ]
    )
    assert config.proxy_protocol == 2
    assert (config.connect_timeout, config.idle_timeout) == (2.5, 300.0)
    assert config.keepalive == KeepAlive(60, 10, 6)
    assert config.nodelay is False
    assert config.pipe_size == 128 * 1024
    assert config.on_limit == "queue"
    assert config.connections_max_per_source == 8
    assert [target.text for target in config.targets] == ["a:1", "vsock:3:1024"]
    assert [(r.name, [t.text for t in r.targets]) for r in config.listeners] == [
        ("web", ["/run/web.sock", "@web2"]),  # a repeated name adds a target
        ("api", ["[::1]:8080"]),
    ]
    assert parse_args(["--nodelay", "a:1"]).nodelay is True


def test_socket_proxyd_prefixes_keep_their_meaning() -> None:
    """--conn was --connections-max for systemd-socket-proxyd; --connect-timeout must not
    make it ambiguous."""
    assert parse_args(["--conn=10", "h:1"]).connections_max == 10
    assert parse_args(["--conn", "10", "h:1"]).connections_max == 10
    assert parse_args(["--connect=3", "h:1"]).connections_max == 3  # its prefix first
    assert parse_args(["--c", "4", "h:1"]).connections_max == 4
    assert parse_args(["--e=1min", "h:1"]).exit_idle_time == 60.0
    assert parse_args(["--connect-timeout=3", "h:1"]).connect_timeout == 3.0


@pytest.mark.parametrize(
    "option",
    ["--connect-t=3", "--inet", "--keep", "--work=2", "--list=8080", "--pipe=64K", "--no-node"],
)
def test_other_options_are_never_abbreviated(option: str) -> None:
    with pytest.raises(UsageError, match="^unrecognized arguments: --"):
        parse_args([option, "h:1"])


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["-p", "v3", "h:1"],
            "option '-p' takes its version attached: write -pv3 or --proxy-protocol=v3 "
            "(a target host named 'v3' needs its port, as in v3:80)",
        ),
        (["h:1", "-p", "v2"], "option '-p' takes its version attached: write -pv2 or"),
        (["--proxy-protocol", "v1", "h:1"], "option '--proxy-protocol' takes its version"),
        (["--proxy-protocol", " V2 ", "h:1"], "option '--proxy-protocol' takes its version"),
        (["--proxy", "v2", "h:1"], "option '--proxy-protocol' takes its version attached"),
        (["-pv3", "h:1"], "invalid --proxy-protocol= value 'v3': expected v1 or v2"),
        (["--proxy-protocol=v3", "h:1"], "invalid --proxy-protocol= value 'v3'"),
        (["-p=v2", "h:1"], "invalid --proxy-protocol= value '=v2'"),
        (
            ["--keepalive", "60s,10s,6", "h:1"],
            "option '--keepalive' takes its value attached: write --keepalive=60s,10s,6 "
            "('60s,10s,6' is no target)",
        ),
        (["--keepalive", "60s", "h:1"], "option '--keepalive' takes its value attached"),
        (["--keepalive", "1,2", "h:1"], "option '--keepalive' takes its value attached"),
    ],
)
def test_optional_values_only_attached(argv: list[str], error: str) -> None:
    """A word after -p or --keepalive is a target, never their value; one that can only
    have been meant as their value is an error, not a target."""
    with pytest.raises(UsageError) as raised:
        parse_args(argv)
    assert str(raised.value).startswith(error)


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--pipe-size=2K", "h:1"], "--pipe-size= must be in 4K-1024M, got '2K'"),
        (["--pipe-size=2048M", "h:1"], "--pipe-size= must be in 4K-1024M, got '2048M'"),
        (["--pipe-size=2097152K", "h:1"], "--pipe-size= must be in 4K-1024M, got '2097152K'"),
        (["--pipe-size=4095", "h:1"], "--pipe-size= must be in 4K-1024M, got '4095'"),
        (["h:1", "--pipe-size"], "option '--pipe-size': expected one argument"),
        (["--connect-timeout=0", "h:1"], "--connect-timeout= must be longer than 0"),
        (["--connect-timeout=soon", "h:1"], "invalid --connect-timeout= value 'soon'"),
        (["--idle-timeout=0", "h:1"], "--idle-timeout= must be longer than 0"),
        (
            ["--max-connections-per-source=x", "h:1"],  # the old spelling, still read
            "invalid --connections-max-per-source= value 'x': expected a whole number",
        ),
        (
            ["--connections-max-per-source=40000", "h:1"],
            "--connections-max-per-source= must be in 0-32767, got 40000",
        ),
        (["--route=web", "h:1"], "invalid route 'web': expected NAME=TARGET"),
        (["--route==h:1", "h:1"], "invalid route '=h:1': name '' may only contain"),
        (["--route=web=::1", "h:1"], "invalid target '::1': write IPv6 addresses in brackets"),
        (["--keepalive=", "h:1"], "invalid --keepalive= value '': expected IDLE,INTERVAL"),
        (["-pv3", "h:1"], "invalid --proxy-protocol= value 'v3': expected v1 or v2"),
        (["--on-limit=queued", "h:1"], "invalid --on-limit= value 'queued'"),
        (["-p"], "missing target"),
    ],
)
def test_errors(argv: list[str], error: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_args(argv)
    assert str(raised.value).startswith(error)


def test_old_spelling_of_the_per_source_limit() -> None:
    assert parse_args(["--max-connections-per-source=3", "h:1"]).connections_max_per_source == 3


def test_config_checks_listener_settings() -> None:
    target = parse_target("h:1")
    web = ListenerSettings("web", (target,))
    with pytest.raises(UsageError, match="listener settings must name distinct listeners"):
        Config(targets=(target,), listeners=(web, web))
    with pytest.raises(UsageError, match="listener 'web' has no target"):
        Config(targets=(target,), listeners=(ListenerSettings("web", ()),))
    with pytest.raises(UsageError, match="--idle-timeout= must be longer than 0"):
        ListenerSettings("web", (target,), idle_timeout=0)
