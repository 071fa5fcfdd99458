"""The health check options: command line and configuration file (per listener too),
defaults, and the exact errors."""

import sys
from pathlib import Path

import pytest

from forkproxy.errors import UsageError, UsageErrors
from forkproxy.settings.address import parse_target
from forkproxy.settings.arguments import parse_args
from forkproxy.settings.config import ListenerSettings


def test_checks_are_off_by_default() -> None:
    settings = parse_args(["h:1"]).global_settings()
    assert not settings.checks
    assert (settings.check_rise, settings.check_fall, settings.check_http) == (2, 3, "")
    assert settings.check_timeout is None


def test_every_check_option() -> None:
    config = parse_args(
        [
            "--check-interval=200ms",
            "--check-http",
            "/health?full=1",
            "--check-rise=4",
            "--check-fall=1",
            "--check-timeout=1s 500ms",
            "h:1",
        ]
    )
    settings = config.global_settings()
    assert settings.checks and settings.check_interval == 0.2
    assert settings.check_http == "/health?full=1"
    assert (settings.check_rise, settings.check_fall) == (4, 1)
    assert settings.effective_check_timeout == 1.5


@pytest.mark.parametrize(
    ("interval", "timeout", "effective"),
    [(0.2, None, 0.2), (10.0, None, 2.0), (10.0, 30.0, 30.0), (0.1, 0.05, 0.05)],
)
def test_the_timeout_defaults_to_the_interval_at_most_2s(
    interval: float, timeout: float | None, effective: float
) -> None:
    settings = ListenerSettings(
        "web", (parse_target("h:1"),), check_interval=interval, check_timeout=timeout
    )
    assert settings.effective_check_timeout == effective


def test_infinity_or_zero_means_no_checks() -> None:
    for text in ("0", "infinity"):
        assert not parse_args([f"--check-interval={text}", "h:1"]).global_settings().checks


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["--check-interval=5ms"],
            "--check-interval= must be 0 (no checks) or at least 10ms, got 5ms",
        ),
        (["--check-interval=often"], "invalid --check-interval= value 'often'"),
        (["--check-rise=0"], "--check-rise= must be in 1-1000, got 0"),
        (["--check-fall=1001"], "--check-fall= must be in 1-1000, got 1001"),
        (["--check-fall=two"], "invalid --check-fall= value 'two': expected a whole number"),
        (["--check-timeout=0"], "--check-timeout= must be longer than 0 and finite"),
        (["--check-timeout=infinity"], "--check-timeout= must be longer than 0 and finite"),
        (["--check-http=health"], "invalid --check-http= value 'health': it must be a path"),
        (["--check-http=/a b"], "invalid --check-http= value '/a b': it must be printable ASCII"),
        (["--check-http="], "invalid --check-http= value '': it must be a path starting"),
        (["--check-http=/é"], "invalid --check-http= value '/é': it must be printable ASCII"),
    ],
)
def test_errors(argv: list[str], error: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_args([*argv, "h:1"])
    assert str(raised.value).startswith(error)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="--config needs tomllib")
def test_per_listener_checks_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "forkproxy.toml"
    path.write_text(
        'targets = ["h:1"]\ncheck-interval = "1s"\ncheck-fall = 2\n'
        '[listeners.web]\ntargets = ["w:1"]\ncheck-http = "/health"\ncheck-rise = 5\n'
        '[listeners.db]\ntargets = ["d:1"]\ncheck-interval = 0\n'
    )
    config = parse_args(["--config", str(path)])
    web, db = config.settings_for("web"), config.settings_for("db")
    assert (web.check_interval, web.check_http, web.check_rise, web.check_fall) == (
        1.0,
        "/health",
        5,
        2,
    )
    assert not db.checks
    assert config.settings_for("other").check_interval == 1.0


@pytest.mark.skipif(sys.version_info < (3, 11), reason="--config needs tomllib")
def test_file_errors_name_their_key(tmp_path: Path) -> None:
    path = tmp_path / "forkproxy.toml"
    path.write_text('targets = ["h:1"]\n[listeners.web]\ncheck-http = "x"\ncheck-rise = 0\n')
    with pytest.raises(UsageErrors) as raised:
        parse_args(["--config", str(path)])
    lines = [line.replace(str(path), "FILE") for line in raised.value.messages]
    assert lines == [
        "FILE:3: key 'check-http' in [listeners.web]: invalid path 'x': it must be a path "
        "starting with '/'",
        "FILE:4: key 'check-rise' in [listeners.web]: must be in 1-1000, got 0",
    ]
