"""argv to Config: systemd-socket-proxyd's spelling, and no traceback for any input."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkproxy.errors import ForkproxyError, UsageError
from forkproxy.settings.arguments import _build_parser, parse_args


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
    try:
        parse_args(argv + target)
    except ForkproxyError as error:  # UsageError among them: cli prints it on one line
        assert str(error)
        if not any(char in arg for arg in argv for char in "\r\n"):  # unless quoted input has one
            assert "\n" not in str(error)
    except SystemExit as exit_:  # --help / --version print and exit 0
        assert exit_.code == 0
