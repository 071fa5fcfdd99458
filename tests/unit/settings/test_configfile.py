"""--config FILE: TOML to Config, the command line over it, and the exact error lines."""

import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from forkproxy.errors import UsageError, UsageErrors
from forkproxy.settings.arguments import _build_parser, load_settings, parse_args
from forkproxy.settings.config import RELAY_OPTIONS, Config
from forkproxy.settings.configfile import NOT_IN_FILE, file_options
from forkproxy.settings.option_values import VALUES
from forkproxy.settings.options import KeepAlive
from forkproxy.settings.relay_arguments import BARE_VALUES

needs_tomllib = pytest.mark.skipif(sys.version_info < (3, 11), reason="--config needs tomllib")


def load(tmp_path: Path, text: str, *argv: str) -> Config:
    path = tmp_path / "forkproxy.toml"
    path.write_text(text)
    return parse_args(["--config", str(path), *argv])


def errors(tmp_path: Path, text: str, *argv: str) -> list[str]:
    """Every error line, with the file's path written as FILE."""
    path = tmp_path / "forkproxy.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as raised:
        parse_args(["--config", str(path), *argv])
    error = raised.value
    lines = error.messages if isinstance(error, UsageErrors) else [str(error)]
    return [line.replace(str(path), "FILE") for line in lines]


def texts(config: Config) -> list[str]:
    return [target.text for target in config.targets]


# -- good files --------------------------------------------------------------------------

GOOD: list[tuple[str, Callable[[Config], object]]] = [
    (
        'targets = ["127.0.0.1:8080", "/run/app.sock"]\nconnections-max = 1024',
        lambda c: (texts(c), c.connections_max) == (["127.0.0.1:8080", "/run/app.sock"], 1024),
    ),
    ('targets = "h:1"', lambda c: texts(c) == ["h:1"]),  # one target needs no list
    ('targets = ["h:1"]\nexit-idle-time = "5min"', lambda c: c.exit_idle_time == 300),
    ('targets = ["h:1"]\nexit-idle-time = 90', lambda c: c.exit_idle_time == 90),
    ('targets = ["h:1"]\nconnect-timeout = 0.25', lambda c: c.connect_timeout == 0.25),
    ('targets = ["h:1"]\nidle-timeout = inf', lambda c: math.isinf(c.idle_timeout)),
    ('targets = ["h:1"]\nidle-timeout = "1h"', lambda c: c.idle_timeout == 3600),
    ('targets = ["h:1"]\nproxy-protocol = "v2"', lambda c: c.proxy_protocol == 2),
    ('targets = ["h:1"]\nproxy-protocol = true', lambda c: c.proxy_protocol == 1),  # -p
    ('targets = ["h:1"]\nproxy-protocol = false', lambda c: c.proxy_protocol == 0),
    ('targets = ["h:1"]\nkeepalive = true', lambda c: c.keepalive == KeepAlive()),
    ('targets = ["h:1"]\nkeepalive = "60s,10s,6"', lambda c: c.keepalive == KeepAlive(60, 10, 6)),
    ('targets = ["h:1"]\nnodelay = false', lambda c: c.nodelay is False),
    ('targets = ["h:1"]\npipe-size = "64K"', lambda c: c.pipe_size == 65536),
    ('targets = ["h:1"]\npipe-size = 65536', lambda c: c.pipe_size == 65536),
    ('targets = ["h:1"]\nsocket-mode = "0600"', lambda c: c.socket_mode == 0o600),
    ('targets = ["h:1"]\nworkers = 3', lambda c: c.workers == 3),
    ('targets = ["h:1"]\nlog-level = "debug"', lambda c: c.log_level == "debug"),
    ('targets = ["h:1"]\nmetrics = "127.0.0.1:9100"', lambda c: c.metrics is not None),
    ('targets = ["h:1"]\non-limit = "queue"', lambda c: c.on_limit == "queue"),
    ('targets = ["h:1"]\ninetd = true', lambda c: c.inetd is True),
    (
        'targets = ["h:1"]\nconnections-max-per-source = 4',
        lambda c: c.connections_max_per_source == 4,
    ),
    (  # the option's first spelling is a key too
        'targets = ["h:1"]\nmax-connections-per-source = 4',
        lambda c: c.connections_max_per_source == 4,
    ),
    (
        'targets = ["h:1"]\nlisten = ["8080", "web=/run/web.sock"]',
        lambda c: (
            [(a.name, a.text) for a in c.listen] == [("", "8080"), ("web", "web=/run/web.sock")]
        ),
    ),
    (
        'targets = ["h:1"]\nroute = ["web=w:1", "web=w:2"]',
        lambda c: (
            [(s.name, [t.text for t in s.targets]) for s in c.listeners]
            == [("web", ["w:1", "w:2"])]
        ),
    ),
    (  # no global targets: every listener has its own
        '[listeners.web]\nlisten = "127.0.0.1:81"\ntargets = ["w:1"]',
        lambda c: (c.targets, c.listeners[0].name, c.listen[0].name) == ((), "web", "web"),
    ),
    (  # quoted names with dots
        'targets = ["h:1"]\n[listeners."web.v2"]\nproxy-protocol = "v1"',
        lambda c: (c.listeners[0].name, c.listeners[0].proxy_protocol) == ("web.v2", 1),
    ),
    (  # an inline table is a section too
        'targets = ["h:1"]\nlisteners = { web = { targets = ["w:1"] } }',
        lambda c: [t.text for t in c.listeners[0].targets] == ["w:1"],
    ),
]


@needs_tomllib
@pytest.mark.parametrize(("text", "check"), GOOD)
def test_good_files(tmp_path: Path, text: str, check: Callable[[Config], object]) -> None:
    assert check(load(tmp_path, text))


@needs_tomllib
def test_a_section_inherits_what_it_does_not_set(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        targets = ["d:1"]
        proxy-protocol = "v2"
        connect-timeout = "3s"
        nodelay = false

        [listeners.web]
        targets = ["w:1", "w:2"]
        idle-timeout = "5min"
        proxy-protocol = false
        keepalive = "1min,10s,6"

        [listeners.api]
        connections-max-per-source = 2
        """,
    )
    web, api = config.listeners
    assert [t.text for t in web.targets] == ["w:1", "w:2"]
    assert (web.proxy_protocol, web.connect_timeout, web.idle_timeout) == (0, 3.0, 300.0)
    assert (web.keepalive, web.nodelay) == (KeepAlive(60, 10, 6), False)
    assert [t.text for t in api.targets] == ["d:1"]  # the global targets
    assert (api.proxy_protocol, api.connections_max_per_source) == (2, 2)
    other = config.settings_for("other")  # no section: the global settings
    assert (other.proxy_protocol, [t.text for t in other.targets]) == (2, ["d:1"])
    assert config.settings_for("web") is web


# -- the command line over the file ------------------------------------------------------


@needs_tomllib
def test_the_command_line_overrides_the_top_level(tmp_path: Path) -> None:
    text = """
    targets = ["file:1"]
    connections-max = 10
    nodelay = false
    proxy-protocol = "v1"
    log-level = "debug"

    [listeners.web]
    idle-timeout = "1min"
    """
    config = load(tmp_path, text, "-c", "20", "--nodelay", "-pv2", "--idle-timeout=1h", "cli:1")
    assert texts(config) == ["cli:1"]  # targets given as arguments replace the file's
    assert (config.connections_max, config.nodelay, config.proxy_protocol) == (20, True, 2)
    assert config.log_level == "debug"  # not given on the command line: the file's
    assert config.idle_timeout == 3600
    (web,) = config.listeners
    # A section is more specific than a global option, wherever that was given.
    assert (web.idle_timeout, web.proxy_protocol, web.nodelay) == (60, 2, True)
    assert [t.text for t in web.targets] == ["cli:1"]


@needs_tomllib
def test_listen_merges_by_name_and_route_replaces_section_targets(tmp_path: Path) -> None:
    text = """
    targets = ["d:1"]
    listen = ["8080", "admin=127.0.0.1:9000"]
    [listeners.web]
    listen = "127.0.0.1:8000"
    targets = ["w:1"]
    """
    argv = ["--listen", "web=127.0.0.1:7000", "-l", "/run/x.sock", "--route", "web=r:1"]
    config = load(tmp_path, text, *argv)
    assert [(a.name, a.text) for a in config.listen] == [
        ("", "8080"),
        ("admin", "admin=127.0.0.1:9000"),
        ("web", "web=127.0.0.1:7000"),  # moved by the command line, in the file's place
        ("", "/run/x.sock"),
    ]
    assert [t.text for t in config.settings_for("web").targets] == ["r:1"]
    # A file's route and the command line's for the same name: the command line's.
    config = load(tmp_path, 'targets = ["d:1"]\nroute = ["api=f:1"]', "--route=api=c:1")
    assert [t.text for t in config.settings_for("api").targets] == ["c:1"]


def test_without_a_file_the_command_line_is_read_as_before() -> None:
    config = parse_args(["--route=web=w:1", "--connect-timeout=2s", "h:1"])
    (web,) = config.listeners
    assert (web.name, web.connect_timeout, web.origin) == ("web", 2.0, "--route=web=...")


# -- bad files: every error, exactly -----------------------------------------------------

BAD: list[tuple[str, list[str]]] = [
    (
        'targets = ["h:1"]\n\nconnect-timeout = "5 minutess"',
        ["FILE:3: key 'connect-timeout': invalid time span '5 minutess': unknown unit 'minutess'"],
    ),
    (
        'targets = ["h:1"]\nworkers = "many"\nconnections-max = 0\npipe-size = "1K"',
        [
            "FILE:2: key 'workers': invalid number 'many': expected a whole number",
            "FILE:3: key 'connections-max': must be at least 1, got 0",
            "FILE:4: key 'pipe-size': must be in 4K-1024M, got '1K'",
        ],
    ),
    (
        'targets = ["h:1"]\nworkers = 2.5\nsocket-mode = "999"\nproxy-protocol = "v3"',
        [
            "FILE:2: key 'workers': invalid number '2.5': expected a whole number",
            "FILE:3: key 'socket-mode': invalid file mode '999': expected octal 0000-0777",
            "FILE:4: key 'proxy-protocol': invalid value 'v3': expected v1 or v2",
        ],
    ),
    (
        'targets = ["h:1", "::1", 7]\nlisten = ["localhost:80"]',
        [
            "FILE:1: key 'targets': invalid target '::1': write IPv6 addresses in brackets, "
            "as in '[::1]:80'",
            "FILE:1: key 'targets': invalid target '7': a host name cannot be a bare number",
            "FILE:2: key 'listen': invalid listen address 'localhost:80': 'localhost' is not "
            "an IP address (write PORT, IPV4:PORT, [IPV6]:PORT, /path or @name)",
        ],
    ),
    (  # wrong types
        'targets = [["h:1"]]\nnodelay = "no"\nconnect-timeout = [5]\nkeepalive = {a = 1}\n'
        "log-level = 3\nworkers = true\nlisten = {}",
        [
            "FILE:1: key 'targets': expected a string or a list of strings, got a list "
            "holding a list",
            "FILE:2: key 'nodelay': expected true or false, got a string",
            "FILE:3: key 'connect-timeout': expected a string or a number, got a list",
            "FILE:4: key 'keepalive': expected a string, true or false, got a table",
            "FILE:5: key 'log-level': invalid log level '3': expected debug, info, warning "
            "or error",
            "FILE:6: key 'workers': expected a string or a number, got a boolean",
            "FILE:7: key 'listen': expected a string or a list of strings, got a table",
        ],
    ),
    (  # unknown keys and sections, keys that cannot be set, one option twice
        'targets = ["h:1"]\nconect-timeout = 1\nconfig = "x"\ncheck = true\n'
        "max-connections-per-source = 2\nconnections-max-per-source = 3\n"
        "[listener.web]\nidle-timeout = 1\n[tls]\ncert = 1",
        [
            "FILE:2: key 'conect-timeout': no such option (did you mean 'connect-timeout'?)",
            "FILE:3: key 'config': cannot be set in a configuration file",
            "FILE:4: key 'check': cannot be set in a configuration file",
            "FILE:6: key 'connections-max-per-source': the same option as "
            "'max-connections-per-source' on line 5",
            "FILE:7: unknown section [listener] (did you mean 'listeners'?)",
            "FILE:9: unknown section [tls] (sections are listeners.NAME)",
        ],
    ),
    (  # listener sections
        'targets = ["h:1"]\n[listeners.web]\nworkers = 2\nlisten = "x=127.0.0.1:1"\n'
        'idle-timout = "1s"\nidle-timeout = 0\n[listeners."a b"]\n[listeners.metrics]\n'
        "[listeners.api.extra]\nx = 1",
        [
            "FILE:3: key 'workers' in [listeners.web]: not a per-listener option (these are: "
            "targets, listen, proxy-protocol, connect-timeout, idle-timeout, keepalive, "
            "nodelay, pipe-size, connections-max-per-source, datagram-timeout, "
            "datagram-replies, check-interval, check-http, check-rise, check-fall, "
            "check-timeout, balance, backup, connect-retry, access-log, access-log-format, "
            "accept-proxy, accept-proxy-from, accept-proxy-untrusted, accept-proxy-timeout)",
            "FILE:4: key 'listen' in [listeners.web]: give the address alone: the section names it",
            "FILE:5: key 'idle-timout' in [listeners.web]: no such option (did you mean "
            "'idle-timeout'?)",
            "FILE:6: key 'idle-timeout' in [listeners.web]: must be longer than 0",
            "FILE:7: section [listeners.\"a b\"]: invalid listener name 'a b': it may only "
            "contain letters, digits, '_', '.' and '-'",
            "FILE:8: section [listeners.metrics]: the name 'metrics' is kept for the metrics "
            "socket",
            "FILE:9: key 'extra' in [listeners.api]: no such option",
        ],
    ),
    (
        "listeners = 3",
        ["FILE:1: key 'listeners': expected sections listeners.NAME, got an integer"],
    ),
    (
        'targets = ["h:1"]\nlisteners.web = "x"',
        ["FILE:2: key 'web': expected a section [listeners.web], got a string"],
    ),
    (  # a listener's name given twice, and targets given two ways
        'targets = ["h:1"]\nlisten = ["web=127.0.0.1:1"]\nroute = ["web=r:1"]\n'
        '[listeners.web]\nlisten = "127.0.0.1:2"\ntargets = ["w:1"]',
        [
            "FILE:5: key 'listen' in [listeners.web]: listener 'web' has an address already "
            "on line 2",
            "FILE:6: key 'targets' in [listeners.web]: listener 'web' has targets in 'route' too",
        ],
    ),
    (
        "[listeners.web]\nidle-timeout = 5",
        [
            "FILE:1: section [listeners.web]: no targets for listener 'web': give targets = "
            "[...] here or at the top of the file"
        ],
    ),
    ("connections-max = 5", ["missing target: give HOST:PORT or a unix socket path (see --help)"]),
    # TOML syntax: tomllib's line and column
    ('targets = ["h:1"]\nworkers = = 2', ["FILE:2:11: invalid TOML: invalid value"]),
    ("a = 1\na = 2", ["FILE:2: invalid TOML: cannot overwrite a value"]),
    ("workers = 1" + "0" * 5000, ["FILE:1: invalid TOML: a number with too many digits"]),
]


@needs_tomllib
@pytest.mark.parametrize(("text", "expected"), BAD)
def test_bad_files(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert errors(tmp_path, text) == expected


@needs_tomllib
def test_errors_of_the_command_line_come_first_and_as_they_are(tmp_path: Path) -> None:
    assert errors(tmp_path, 'targets = ["h:1"]\nworkers = 0', "--connect-timeout=x") == [
        "invalid --connect-timeout= value 'x': expected a number at 'x'",
        "FILE:2: key 'workers': must be in 1-128, got 0",
    ]


@needs_tomllib
def test_several_errors_are_one_line_without_check(tmp_path: Path) -> None:
    path = tmp_path / "forkproxy.toml"
    path.write_text("workers = 0\nconnections-max = 0\ntargets = 5")
    with pytest.raises(UsageError) as raised:
        parse_args(["--config", str(path)])
    assert str(raised.value) == (
        f"{path}:1: key 'workers': must be in 1-128, got 0 "
        "(and 2 more: forkproxy --check lists them all)"
    )


@needs_tomllib
def test_a_file_that_cannot_be_read(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(UsageError) as raised:
        parse_args(["--config", str(missing)])
    assert str(raised.value) == (
        f"cannot read configuration file '{missing}': No such file or directory"
    )
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'targets = ["h:1"]\n# \xff\n')
    with pytest.raises(UsageError) as raised:
        parse_args(["--config", str(binary)])
    assert str(raised.value) == f"{binary}:2: invalid TOML: not UTF-8 text"


# -- one source of truth -----------------------------------------------------------------


def test_every_option_is_a_key_read_by_its_own_parser() -> None:
    """Keys come from the argparse definition, so an option added there is a key; each
    value option has its parser in option_values.VALUES."""
    parser = _build_parser()
    options = file_options(parser, BARE_VALUES)
    long_options = {
        spelling[2:]
        for action in parser._actions
        for spelling in action.option_strings
        if spelling.startswith("--") and action.dest not in NOT_IN_FILE
    }
    assert set(options) == (long_options - {"no-nodelay"}) | {"targets"}
    for option in options.values():
        assert option.dest in VALUES or option.kind.value == "flag", option
    assert set(RELAY_OPTIONS) <= {option.dest for option in options.values()}


def test_on_python_3_10_config_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "forkproxy.toml"
    path.write_text('targets = ["h:1"]')
    monkeypatch.setattr(sys, "version_info", (3, 10, 12, "final", 0))
    monkeypatch.setattr(sys, "version", "3.10.12 (main)")
    with pytest.raises(UsageError) as raised:
        parse_args(["--config", str(path)])
    assert str(raised.value) == (
        "--config needs Python 3.11 or later (for its TOML reader, tomllib); this is Python 3.10.12"
    )


@needs_tomllib
def test_access_log_and_accept_proxy_per_listener(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        'targets = ["127.0.0.1:9"]\n'
        'access-log = "/var/log/forkproxy.log"\n'
        "[listeners.edge]\n"
        "accept-proxy = true\n"
        'accept-proxy-from = ["10.0.0.0/8", "2001:db8::/32"]\n'
        'accept-proxy-untrusted = "direct"\n'
        'accept-proxy-timeout = "2s"\n'
        'access-log-format = "json"\n',
    )
    edge = config.settings_for("edge")
    other = config.settings_for("other")
    assert (edge.access_log, edge.access_log_format) == ("/var/log/forkproxy.log", "json")
    assert [str(network) for network in edge.accept_proxy_from] == ["10.0.0.0/8", "2001:db8::/32"]
    assert (edge.accept_proxy, edge.accept_proxy_untrusted, edge.accept_proxy_timeout) == (
        True,
        "direct",
        2.0,
    )
    assert (other.accept_proxy, other.access_log_format) == (False, "logfmt")


@needs_tomllib
def test_a_bad_network_names_its_line(tmp_path: Path) -> None:
    assert errors(
        tmp_path, 'targets = ["127.0.0.1:9"]\naccept-proxy-from = ["10.0.0.0/8", "x"]\n'
    ) == [
        "FILE:2: key 'accept-proxy-from': invalid network 'x': expected an IP network such as "
        "10.0.0.0/8 or an address"
    ]


def test_load_settings_gives_the_text_it_read_and_takes_one(tmp_path: Path) -> None:
    """A reload remembers the text a master runs with, and can parse it again when the
    file has changed since: errors still name the file and line."""
    path = tmp_path / "forkproxy.toml"
    path.write_text('targets = ["127.0.0.1:1"]\nworkers = 2\n')
    config, text = load_settings(["--config", str(path)])
    assert text == path.read_text() and config.workers == 2
    path.write_text("targets = [")
    assert load_settings(["--config", str(path)], text) == (config, text)
    with pytest.raises(UsageError, match=r"forkproxy.toml:2: key 'bogus': no such option"):
        load_settings(["--config", str(path)], "workers = 2\nbogus = 1\n")
    assert load_settings(["127.0.0.1:1"]) == (parse_args(["127.0.0.1:1"]), None)
    assert load_settings(["127.0.0.1:1"], "ignored = 1") == (parse_args(["127.0.0.1:1"]), None)


def test_a_file_name_with_a_nul_byte_is_one_error() -> None:
    with pytest.raises(UsageError) as raised:
        parse_args(["--config", "a\0b.toml"])
    assert str(raised.value).startswith("cannot read configuration file ")
    assert str(raised.value).endswith(": a NUL byte in its name")
