"""The unit files in systemd/ and those forkproxy-units generates, checked by systemd itself:
`systemd-analyze verify` with zero warnings, and `systemd-analyze security --offline=yes`
exposure of forkproxy.service at 1.5 or lower."""

import shlex
import shutil
from pathlib import Path

import pytest

from forkproxy.units.arguments import parse_args
from forkproxy.units.render import quote_exec_arg, render
from tests.support.systemd_analyze import (
    SYSTEMD_ANALYZE,
    security_exposure,
    system_root,
    unit_dir,
    user_home,
    verify_system,
    verify_user,
)
from tests.support.systemd_exec_words import split_exec_words

pytestmark = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")

SHIPPED = Path(__file__).resolve().parents[2] / "systemd"
UNIT_SUFFIXES = (".socket", ".service")
MAX_EXPOSURE = 1.5
# Arguments that need every kind of ExecStart= escaping. forkproxy-units refuses control
# characters in options (they would break its header comment), but quotes them right.
AWKWARD_ARGS = [
    "a b", 'say "hi"', "it's", "back\\slash", "100%", "%n", "$HOME", "${HOME}", "$$", ";",
    "\\;", "", "ünïcødé", "[x]", "-x", "--x=1 2", "trailing\\",
]  # fmt: skip
CONTROL_ARGS = ["tab\there", "new\nline", "\x7fdel", "\x01"]


def shipped_units() -> list[Path]:
    return sorted(p for p in SHIPPED.iterdir() if p.suffix in UNIT_SUFFIXES)


def install_shipped(root: Path) -> list[str]:
    """Copy systemd/ into the root's /etc/systemd/system; return the unit names to verify."""
    for path in SHIPPED.iterdir():
        if path.is_dir():
            shutil.copytree(path, unit_dir(root) / path.name)
        else:
            shutil.copy(path, unit_dir(root))
    # nginx.service (the stub) loads the drop-ins in systemd/nginx.service.d/.
    return [p.name for p in shipped_units()] + ["nginx.service"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return system_root(tmp_path)


def test_the_examples_are_all_shipped() -> None:
    names = {p.name for p in shipped_units()}
    assert {
        "forkproxy.socket", "forkproxy.service",
        "proxy-to-nginx.socket", "proxy-to-nginx.service",
        "proxy-to-nginx-netns.socket", "proxy-to-nginx-netns.service",
        "proxy-to-nginx-idle.socket", "proxy-to-nginx-idle.service",
        "webproxy.socket", "webproxy-metrics.socket", "webproxy.service",
        "forkproxy-accept.socket", "forkproxy-accept@.service",
    } <= names  # fmt: skip
    assert {p.name for p in (SHIPPED / "nginx.service.d").iterdir()} == {
        "proxy-to-nginx-idle.conf",
        "proxy-to-nginx-netns.conf",
    }


def test_shipped_units_verify_without_warnings(root: Path) -> None:
    analysis = verify_system(root, install_shipped(root))
    assert analysis.clean, analysis.output


EXEC_START = "ExecStart=/usr/local/bin/forkproxy 127.0.0.1:8080"
IDLE_DROP_IN = "nginx.service.d/proxy-to-nginx-idle.conf"


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        ("forkproxy.service", "Type=notify", "Type=notify\nBogus=1", "Unknown key 'Bogus'"),
        ("forkproxy.service", "ProtectSystem=strict", "ProtectSystem=strictly", "strictly"),
        ("forkproxy.service", "/usr/local/bin/forkproxy", "/usr/bin/forkproxy", "not executable"),
        ("forkproxy.service", EXEC_START, EXEC_START + ' "x', "Unbalanced quoting"),
        ("forkproxy.service", EXEC_START, EXEC_START + ' "\\q"', "unknown escape"),
        ("forkproxy.socket", "ListenStream=80", "ListenStream=80000", "80000"),
        ("webproxy-metrics.socket", "Service=webproxy.service", "Service=nope.service", "nope"),
        (IDLE_DROP_IN, "StopWhenUnneeded=yes", "StopWhenUnneeded=maybe", "maybe"),
    ],
)
def test_verify_reports_a_broken_unit(
    root: Path, file: str, old: str, new: str, expected: str
) -> None:
    """The check above is honest: spoil one line of a shipped file and it fails."""
    names = install_shipped(root)
    path = unit_dir(root) / file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    analysis = verify_system(root, names)
    assert not analysis.clean
    assert expected in analysis.output


@pytest.mark.parametrize("unit", [p.name for p in shipped_units() if p.suffix == ".service"])
def test_shipped_services_exposure(root: Path, unit: str) -> None:
    install_shipped(root)
    exposure, report = security_exposure(root, unit)
    print(f"{unit}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, report


def test_forkproxy_service_exposure(root: Path) -> None:
    install_shipped(root)
    exposure, report = security_exposure(root, "forkproxy.service")
    assert exposure <= MAX_EXPOSURE, report


# The mixed targets of the acceptance test; tests/integration/test_systemd_boot.py runs them.
ACCEPTANCE = "web --listen-stream 8080 -- 127.0.0.1:9001 [::1]:9002 /run/app.sock"
GENERATED = [
    "a --listen-stream 8080 -- 127.0.0.1:9000",
    "b --listen-stream 127.0.0.1:8080 --listen-stream [::1]:8080 -- [::1]:9000 -c 1000",
    "c --listen-unix /run/c/c.sock --socket-user www-data --socket-group www-data "
    "--socket-mode 0660 --backlog 512 -- backend.example:443 --workers=4",
    "d --listen-unix @d-proxy --description 'd: 100% abstract' -- @upstream",
    "e --listen-stream 80 --accept --max-connections 10 -- /run/e.sock",
    "f --listen-stream 80 --metrics /run/f-metrics.sock -- 10.0.0.1:80 --exit-idle-time=5min",
    "g --listen-stream 80 --target-unit nginx.service --share-namespace -- @nginx",
    "h --listen-stream 80 --executable /usr/local/bin/forkproxy -- [fe80::1%eth0]:80",
    "i --listen-stream [fe80::1%lo]:80 --listen-stream [::1]:80%lo --metrics [fe80::2%lo]:9100 "
    "-- 127.0.0.1:80 --graceful-timeout=5min --route admin=vsock:2:80",
    "j --listen-stream 80 --accept -- 127.0.0.1:80 /run/j.sock --graceful-timeout=infinity",
    "k --listen-stream 80 -- /run/k.sock --route admin=db.example:5432",
    "l --listen-stream 80 -- /home/l/l.sock",
    ACCEPTANCE,
    "m --listen-datagram 127.0.0.1:53 --listen-datagram [::1]:53 -- udp:127.0.0.1:5353 "
    "--datagram-replies=1",
    "n --listen-unix-datagram /run/n/log.sock --socket-mode 0660 -- unix-dgram:/run/log.sock "
    "--datagram-timeout=5min",
    "o --listen-sequential-packet @o -- seqpacket:/run/o.sock",
    "p --listen-datagram 127.0.0.1:8125 --metrics 127.0.0.1:9102 -- udp:statsd.example:8125",
]


@pytest.mark.parametrize("command", GENERATED)
def test_generated_system_units_verify_without_warnings(root: Path, command: str) -> None:
    request, _ = parse_args(shlex.split(command))
    files = render(request)
    for name, text in files.items():
        (unit_dir(root) / name).write_text(text)
    analysis = verify_system(root, list(files))
    assert analysis.clean, analysis.output


@pytest.mark.parametrize("command", [ACCEPTANCE, GENERATED[1], GENERATED[-2]])
def test_generated_service_exposure(root: Path, command: str) -> None:
    request, _ = parse_args(shlex.split(command))
    for name, text in render(request).items():
        (unit_dir(root) / name).write_text(text)
    exposure, report = security_exposure(root, request.service_name)
    print(f"{command}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, report


@pytest.mark.parametrize(
    "command",
    [
        "u --listen-stream 8080 -- 127.0.0.1:9000",
        "v --listen-unix /tmp/v.sock --socket-mode 600 --metrics 127.0.0.1:9100 -- /run/v",
        "w --listen-stream 8080 --accept -- example.org:80",
        "x --listen-datagram 5353 -- udp:[::1]:53",
    ],
)
def test_generated_user_units_verify_without_warnings(tmp_path: Path, command: str) -> None:
    request, _ = parse_args(["--user", *shlex.split(command)])
    units = tmp_path / "units"
    units.mkdir()
    for name, text in render(request).items():
        (units / name).write_text(text)
    home = user_home(tmp_path)
    analysis = verify_user(home, sorted(units.iterdir()))
    assert analysis.clean, analysis.output
    (home / ".local/bin/forkproxy").unlink()  # and it does look for the executable
    assert "not executable" in verify_user(home, sorted(units.iterdir())).output


def test_awkward_exec_arguments_verify_without_warnings(root: Path) -> None:
    """forkproxy itself refuses such options, so they go into a rendered unit by hand."""
    request, _ = parse_args(["odd", "--listen-stream", "80", "--", "127.0.0.1:80"])
    files = render(request)
    awkward = " ".join(quote_exec_arg(arg) for arg in AWKWARD_ARGS)
    exec_start = "ExecStart=/usr/local/bin/forkproxy 127.0.0.1:80"
    assert exec_start in files["odd.service"]
    files["odd.service"] = files["odd.service"].replace(exec_start, f"{exec_start} {awkward}")
    for name, text in files.items():
        (unit_dir(root) / name).write_text(text)
    analysis = verify_system(root, list(files))
    assert analysis.clean, analysis.output


@pytest.mark.skipif(split_exec_words is None, reason="libsystemd-shared not found")
@pytest.mark.parametrize("arg", AWKWARD_ARGS + CONTROL_ARGS)
def test_exec_arguments_round_trip_through_systemds_parser(arg: str) -> None:
    assert split_exec_words is not None
    line = " ".join(quote_exec_arg(word) for word in ["before", arg, "after"])
    assert ";" not in line.split()  # a lone ';' would end the command
    words = split_exec_words(line)
    # After splitting, systemd expands specifiers ('%%') and, at exec, variables ('$$').
    assert [w.replace("%%", "%").replace("$$", "$") for w in words] == ["before", arg, "after"]
