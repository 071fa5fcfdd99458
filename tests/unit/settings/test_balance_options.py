"""--balance, --backup and --connect-retry: command line and configuration file (per
listener too), defaults, and the exact errors."""

from pathlib import Path

import pytest

from forkproxy.errors import UsageError
from forkproxy.settings.address import parse_target
from forkproxy.settings.arguments import parse_args


def test_defaults() -> None:
    settings = parse_args(["h:1"]).global_settings()
    assert (settings.balance, settings.backup, settings.connect_retry) == ("round-robin", (), 0)


def test_every_option() -> None:
    config = parse_args(
        [
            "--balance=least-connections",
            "--backup",
            "b:1",
            "--backup=/run/b.sock",
            "--connect-retry=1min 30s",
            "h:1",
        ]
    )
    settings = config.global_settings()
    assert settings.balance == "least-connections"
    assert settings.backup == (parse_target("b:1"), parse_target("/run/b.sock"))
    assert settings.connect_retry == 90.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--balance=random", "h:1"],
            "invalid --balance= value 'random': expected one of round-robin, "
            "least-connections, source, first",
        ),
        (
            ["--connect-retry=infinity", "h:1"],
            "--connect-retry= must be 0 (no retries) or a finite time span",
        ),
        (
            ["--connect-retry=5 parsecs", "h:1"],
            "invalid --connect-retry= value '5 parsecs': expected a number at 'parsecs'",
        ),
        (["--backup=h:1", "h:1"], "--backup=h:1 is a target already"),
        (["--backup=b:1", "--backup=b:1", "h:1"], "--backup=b:1 is a target already"),
        (
            ["--backup=udp:b:1", "h:1"],
            "the targets mix socket kinds: 'h:1' (stream), 'udp:b:1' (datagram); give "
            "targets of one kind",
        ),
    ],
)
def test_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_args(argv)
    assert str(raised.value) == message


def test_per_listener_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "forkproxy.toml"
    path.write_text(
        'targets = ["h:1"]\n'
        'balance = "source"\n'
        "[listeners.web]\n"
        'targets = ["w:1", "w:2"]\n'
        'backup = ["w:9"]\n'
        'balance = "first"\n'
        'connect-retry = "2s"\n'
    )
    config = parse_args(["--config", str(path)])
    assert config.global_settings().balance == "source"
    web = config.settings_for("web")
    assert (web.balance, web.backup, web.connect_retry) == ("first", (parse_target("w:9"),), 2)


def test_a_bad_value_in_the_file_names_its_key(tmp_path: Path) -> None:
    path = tmp_path / "forkproxy.toml"
    path.write_text('targets = ["h:1"]\n[listeners.web]\nbalance = "nope"\n')
    with pytest.raises(UsageError) as raised:
        parse_args(["--config", str(path)])
    assert str(raised.value) == (
        f"{path}:3: key 'balance' in [listeners.web]: invalid balancing mode 'nope': "
        "expected one of round-robin, least-connections, source, first"
    )
