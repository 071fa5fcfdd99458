"""argv to Config: systemd-socket-proxyd's spelling, and no traceback for any input."""

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkproxy.errors import ForkproxyError, UsageError
from forkproxy.settings.arguments import _build_parser, parse_args
from forkproxy.settings.config import Config
from tests.support.argv import ARGVS


def test_defaults_match_systemd_socket_proxyd() -> None:
    config = parse_args(["127.0.0.1:80"])
    assert config.connections_max == 256
    assert math.isinf(config.exit_idle_time)
    assert config.target.text == "127.0.0.1:80"
    assert config.workers >= 1


@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "10", "--exit-idle-time=5min 20s", "h:1"],
        ["-c10", "--exit-idle-time", "5min 20s", "h:1"],
        ["--connections-max=10", "--exit-idle-time=320", "h:1"],
        ["h:1", "-c", "10", "--exit-idle-time=320s"],  # options after the target (getopt)
        ["--conn=10", "--exit-idle=320", "h:1"],  # unambiguous prefixes (getopt_long)
    ],
)
def test_getopt_long_spellings(argv: list[str]) -> None:
    config = parse_args(argv)
    assert (config.connections_max, config.exit_idle_time) == (10, 320.0)


@pytest.mark.parametrize(
    ("argv", "fields"),
    [
        # systemd-socket-proxyd(8)'s examples and its options, each spelling getopt_long takes
        (["/run/nginx/socket"], {"targets": ("/run/nginx/socket",)}),
        (["--exit-idle-time=5min", "127.0.0.1:8080"], {"exit_idle_time": 300.0}),
        (["--exit-idle-time", "5min", "127.0.0.1:8080"], {"exit_idle_time": 300.0}),
        (["-c", "16", "127.0.0.1:8080"], {"connections_max": 16}),
        (["-c16", "127.0.0.1:8080"], {"connections_max": 16}),
        (["--connections-max", "16", "[::1]:80"], {"connections_max": 16}),
        (["127.0.0.1:8080", "--connections-max=16"], {"connections_max": 16}),
        (["--connections=16", "--exit=1h", "h:1"], {"connections_max": 16, "exit_idle_time": 3600}),
        (["--proxy-protocol=v1", "127.0.0.1:8080"], {"proxy_protocol": 1}),
        (["--proxy-protocol=v1", "--", "127.0.0.1:8080"], {"proxy_protocol": 1}),
    ],
)
def test_systemd_socket_proxyd_command_lines_keep_their_meaning(
    argv: list[str], fields: dict[str, object]
) -> None:
    config = parse_args(argv)
    for field, value in fields.items():
        if field == "targets":
            assert tuple(target.text for target in config.targets) == value
        else:
            assert getattr(config, field) == value


@pytest.mark.parametrize("argv", [["-h"], ["--help"], ["--he"], ["--version"], ["--v"]])
def test_help_and_version_spellings_print_and_exit_0(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(("usage: forkproxy", "forkproxy "))


def test_extensions() -> None:
    config = parse_args(
        [
            "-w",
            "3",
            "-l",
            "8080",
            "--listen=web=127.0.0.1:81",
            "--graceful-timeout=1min",
            "--worker-timeout=5s",
            "--socket-mode=0600",
            "/run/app.sock",
        ]
    )
    assert config.workers == 3
    assert [listen.text for listen in config.listen] == ["8080", "web=127.0.0.1:81"]
    assert (config.graceful_timeout, config.worker_timeout, config.socket_mode) == (60, 5, 0o600)


def test_duplicate_listen_names_are_refused() -> None:
    with pytest.raises(UsageError, match="names must be unique"):
        parse_args(["-l", "a=1.2.3.4:1", "-l", "a=1.2.3.4:2", "h:1"])


_TOKENS = st.sampled_from(
    [
        "-c",
        "--connections-max",
        "--exit-idle-time",
        "-w",
        "--workers",
        "-l",
        "--listen",
        "--socket-mode",
        "--graceful-timeout",
        "--worker-timeout",
        "--log-level",
        "--",
        "-x",
        "--c",
        "0",
        "1",
        "-1",
        "5min",
        "foo",
        "h:1",
        "[::1]:2",
        "/p",
        "@a",
        "",
        "=",
        "--connections-max=",
        "--exit-idle-time=",
        "debug",
        "8080",
    ]
)


@settings(max_examples=300)
@given(st.lists(st.one_of(_TOKENS, st.text(max_size=12)), max_size=6))
def test_no_argv_escapes_as_anything_but_a_usage_error(argv: list[str]) -> None:
    try:
        parse_args(argv)
    except UsageError as error:
        assert str(error)
    except SystemExit as exit_:  # --help / --version
        assert exit_.code == 0


# Every option the parser knows, so options added later are covered too.
_OPTIONS = sorted(
    option
    for action in _build_parser()._actions
    for option in action.option_strings
    if option not in ("-h", "--help", "--version")
)
_VALUES = st.sampled_from(
    [
        "0",
        "1",
        "-1",
        "65536",
        "99999999999999999999",
        "5min",
        "infinity",
        "1.5",
        "x",
        "",
        "=",
        ",",
        "30,5,3",
        "64K",
        "1M",
        "v1",
        "v2",
        "queue",
        "refuse",
        "web=h:1",
        "web=127.0.0.1:80",
        "127.0.0.1:0",
        "[::1]:80",
        "/p",
        "@a",
        "debug",
        "0777",
        "\udcff",
    ]
)
_ARGUMENTS = st.one_of(
    st.sampled_from(_OPTIONS),
    st.tuples(st.sampled_from(_OPTIONS), _VALUES).map(lambda pair: "=".join(pair)),
    _VALUES,
    st.text(max_size=12),
)


@settings(max_examples=500)
@given(st.lists(_ARGUMENTS, max_size=8), st.sampled_from([[], ["h:1"], ["/run/app.sock"]]))
def test_no_combination_of_options_escapes_as_anything_but_one_error(
    argv: list[str], target: list[str]
) -> None:
    _config_or_one_line_error(argv + target)


@settings(max_examples=1000, deadline=None)
@given(ARGVS, st.sampled_from([[], ["h:1"], ["/run/app.sock"]]))
def test_hostile_command_lines_are_a_config_or_one_printable_line(
    argv: list[str], target: list[str]
) -> None:
    """Huge numbers, control characters, bytes that are not UTF-8, in any option or
    target: a Config, or an error whose message is one printable line."""
    _config_or_one_line_error(argv + target)


def _config_or_one_line_error(argv: list[str]) -> None:
    try:
        config = parse_args(argv)
    except ForkproxyError as error:  # UsageError among them: cli prints it on one line
        message = str(error)
        assert message and message.isprintable(), message
        assert len(message) < 1000, message
    except SystemExit as exit_:  # --help / --version (or a prefix of them) print and exit 0
        assert exit_.code == 0
    else:
        assert isinstance(config, Config)
        for target in config.targets:
            assert target.text.isprintable()  # it goes into the process title and logs


HUGE = "9" * 5000  # past Python's 4300-digit limit of int() and str()


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["-w", HUGE, "h:1"], "invalid --workers= value '999"),
        (["-c", HUGE, "h:1"], "invalid --connections-max= value '999"),
        (["--max-connections-per-source", HUGE, "h:1"], "invalid --connections-max-per-source="),
        (["--pipe-size", HUGE, "h:1"], "invalid --pipe-size= value '999"),
        (["--pipe-size", HUGE + "K", "h:1"], "invalid --pipe-size= value '999"),
        (["--socket-mode", HUGE, "h:1"], "invalid --socket-mode= value '999"),
        (["--exit-idle-time", HUGE, "h:1"], "invalid --exit-idle-time= value '999"),
        (["--worker-timeout", HUGE + "ms", "h:1"], "invalid --worker-timeout= value '999"),
        (["--connect-timeout=1." + HUGE, "h:1"], None),  # sub-microsecond digits: dropped
        (["--idle-timeout", "+" + HUGE, "h:1"], "invalid --idle-timeout= value '+999"),
        (["--keepalive=" + HUGE + ",1,1", "h:1"], "invalid --keepalive= IDLE '999"),
        (["--keepalive=1,1," + HUGE, "h:1"], "invalid --keepalive= PROBES '999"),
        (["h:" + HUGE], "invalid target 'h:999"),
        (["[::1]:" + HUGE], "invalid target '[::1]:999"),
        (["vsock:" + HUGE + ":1"], "invalid target 'vsock:999"),
        (["vsock:1:" + HUGE], "invalid target 'vsock:1:999"),
        (["--listen", HUGE, "h:1"], "invalid listen address '999"),
        (["--listen", "127.0.0.1:" + HUGE, "h:1"], "invalid listen address '127.0.0.1:999"),
        (["--metrics", "127.0.0.1:" + HUGE, "h:1"], "invalid metrics address '127.0.0.1:999"),
        (["--route", "web=h:" + HUGE, "h:1"], "invalid target 'h:999"),
    ],
)
def test_huge_numbers_are_one_short_error(argv: list[str], error: str | None) -> None:
    """Thousands of digits in any numeric field: a clear line, not int()'s ValueError."""
    if error is None:
        assert parse_args(argv).connect_timeout == pytest.approx(2.0)
        return
    with pytest.raises(UsageError) as raised:
        parse_args(argv)
    message = str(raised.value)
    assert message.startswith(error)
    assert "\n" not in message and len(message) < 400
    assert re.search(r"\.\.\.' \(500[0-9] characters\)", message)


def test_leading_zeros_do_not_count() -> None:
    config = parse_args(["-c", "0" * 5000 + "1", "-w", "0" * 5000 + "2", "h:0" + "0" * 5000 + "80"])
    assert (config.connections_max, config.workers, config.target.port) == (1, 2, 80)


@pytest.mark.parametrize(
    "argv",
    [
        ["--metrics=0:\n", "h:1"],
        ["--metrics=127.0.0.1:\n80", "h:1"],
        ["--listen=\n", "h:1"],
        ["--route=we\nb=h:1", "h:1"],
        ["h:1\n"],
        ["[::1%\n]:80"],
        ["--exit-idle-time=5\nminutess", "h:1"],
        ["--pipe-size=1\x1b[2J", "h:1"],
        ["--log-level=\ndebug", "h:1"],
        ["--on-limit=\r", "h:1"],
        ["--bogus\n", "h:1"],
        ["-c", "\udcff", "h:1"],
    ],
)
def test_control_characters_are_escaped_in_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError) as raised:
        parse_args(argv)
    assert str(raised.value).isprintable(), str(raised.value)


def test_duplicate_listen_addresses_are_refused() -> None:
    with pytest.raises(UsageError, match="^--listen=web=/run//a.sock is given twice$"):
        parse_args(["-l", "/run/a.sock", "-l", "web=/run//a.sock", "h:1"])
    with pytest.raises(UsageError, match="^--listen=web=@a is given twice$"):
        parse_args(["-l", "@a", "-l", "web=@a", "h:1"])
    with pytest.raises(UsageError, match="given twice"):
        parse_args(["-l", "8080", "-l", "[::]:8080", "h:1"])
    assert len(parse_args(["-l", "127.0.0.1:80", "-l", "127.0.0.2:80", "h:1"]).listen) == 2
    assert len(parse_args(["-l", "/run/a.sock", "-l", "/run/b.sock", "h:1"]).listen) == 2


@pytest.mark.parametrize("option", ["--metrics=127.0.0.1:9100", "--route=web=h:2"])
def test_inetd_refuses_metrics_and_routes(option: str) -> None:
    with pytest.raises(UsageError, match="cannot be used with --inetd"):
        parse_args(["--inetd", option, "h:1"])
    parse_args([option, "h:1"])  # fine without --inetd


def test_inetd_is_not_abbreviated() -> None:
    """--inet would be --inetd to argparse's abbreviations, and slip past checks for it."""
    with pytest.raises(UsageError, match="^unrecognized arguments: --inet$"):
        parse_args(["--inet", "h:1"])
    assert parse_args(["--inetd", "h:1"]).inetd


def test_help_ends_by_naming_the_man_page() -> None:
    assert _build_parser().format_help().rstrip().endswith("man forkproxy")


def test_max_connections_per_source_is_a_hidden_alias() -> None:
    help_text = _build_parser().format_help()
    assert "--connections-max-per-source" in help_text
    assert "--max-connections-per-source" not in help_text
    old = parse_args(["--max-connections-per-source=3", "h:1"])
    assert old == parse_args(["--connections-max-per-source=3", "h:1"])
    assert old.connections_max_per_source == 3
