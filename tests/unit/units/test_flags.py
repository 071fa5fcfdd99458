"""forkproxy-units: the stop timeout, what --accept refuses, unit naming, listen
addresses (scoped, duplicate, metrics), the default executable, old flag spellings and the
help's last line."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from forkproxy.errors import ForkproxyError
from forkproxy.units import run
from forkproxy.units.arguments import USAGE, canonical_args, default_executable, parse_args
from forkproxy.units.render import MASTER_KILL_MARGIN, render


def units(command: str | list[str]) -> dict[str, str]:
    argv = shlex.split(command) if isinstance(command, str) else command
    return render(parse_args(argv)[0])


def setting(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def refused(command: str) -> str:
    with pytest.raises(ForkproxyError) as raised:
        parse_args(shlex.split(command))
    return str(raised.value)


# ---- TimeoutStopSec= outlasts the graceful timeout ---------------------------------------


@pytest.mark.parametrize(
    ("options", "timeout"),
    [
        ("", None),  # 30s graceful: systemd's 90s default is enough
        ("--graceful-timeout=83s", None),  # 83 + 2 + 5 = 90
        ("--graceful-timeout=84s", "91s"),
        ("--graceful-timeout=90", "97s"),
        ("--graceful-timeout=5min", "307s"),
        ("--graceful-timeout=100.5", "108s"),
        ("--graceful-timeout=infinity", "infinity"),
    ],
)
@pytest.mark.parametrize("accept", ["", "--accept"])
def test_timeout_stop_outlasts_the_graceful_timeout(
    options: str, timeout: str | None, accept: str
) -> None:
    files = units(f"web --listen-stream 80 {accept} -- 127.0.0.1:80 {options}")
    service = files["web@.service" if accept else "web.service"]
    assert setting(service, "TimeoutStopSec") == ([timeout] if timeout else [])


def test_kill_margin_is_the_masters() -> None:
    from forkproxy.supervisor.workers import KILL_MARGIN

    assert MASTER_KILL_MARGIN == KILL_MARGIN


# ---- --accept refuses what means nothing per connection ----------------------------------

PER_CONNECTION_REFUSED = [
    ("-c 5", "--connections-max"),
    ("--connections-max=5", "--connections-max"),
    ("-w 4", "--workers"),
    ("-w4", "--workers"),
    ("--workers 4", "--workers"),
    ("--worker-timeout=10s", "--worker-timeout"),
    ("--exit-idle-time=5min", "--exit-idle-time"),
    ("--exit-idle-time infinity", "--exit-idle-time"),
    ("--on-limit=queue", "--on-limit"),
    ("--on-limit refuse", "--on-limit"),
    ("--max-connections-per-source=4", "--connections-max-per-source"),  # its old spelling
    ("--connections-max-per-source=4", "--connections-max-per-source"),
    ("--route admin=/run/x", "--route"),
]


@pytest.mark.parametrize(("options", "option"), PER_CONNECTION_REFUSED)
def test_accept_refuses_options_that_mean_nothing_per_connection(options: str, option: str) -> None:
    message = refused(f"web --listen-stream 80 --accept -- 127.0.0.1:80 {options}")
    assert message.startswith(f"forkproxy option '{option}' means nothing with --accept: ")
    parse_args(shlex.split(f"web --listen-stream 80 -- 127.0.0.1:80 {options}"))  # no --accept


@pytest.mark.parametrize(
    "options",
    [
        "--graceful-timeout=10min",  # a stopped instance lets its connection finish
        "--connect-timeout=2s --idle-timeout=1h --keepalive --no-nodelay --pipe-size=64K",
        "--proxy-protocol=v2 --log-level=debug 127.0.0.2:80 /run/fallback.sock",
    ],
)
def test_accept_keeps_options_that_apply_to_one_connection(options: str) -> None:
    files = units(f"web --listen-stream 80 --accept -- 127.0.0.1:80 {options}")
    assert setting(files["web@.service"], "ExecStart")[0].endswith(options)


# ---- naming the units --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["web", "w:x\\y_z.1", "-web", "a-b-c", "x" * 247, "1", "web.socket-like", "A.B"]
)
def test_any_valid_unit_name_prefix_works_with_unit(name: str) -> None:
    request, _ = parse_args(["--unit", name, "--listen-stream", "80", "--", "127.0.0.1:80"])
    assert list(render(request)) == [f"{name}.socket", f"{name}.service"]
    assert parse_args(canonical_args(request))[0] == request  # the header's command works


@pytest.mark.parametrize(
    "argv",
    [
        ["--unit", "web", "--listen-stream", "80", "127.0.0.1:80", "-c", "5"],
        ["--unit=web", "--listen-stream", "80", "--", "127.0.0.1:80", "-c", "5"],
        ["--listen-stream", "80", "--unit", "web", "127.0.0.1:80", "-c", "5"],
        ["web", "--listen-stream", "80", "127.0.0.1:80", "-c", "5"],
    ],
)
def test_unit_flag_spells_the_name(argv: list[str]) -> None:
    request, _ = parse_args(argv)
    assert (request.name, request.target, request.forkproxy_args) == (
        "web",
        "127.0.0.1:80",
        ("-c", "5"),
    )


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (
            "web --unit web2 --listen-stream 80 127.0.0.1:80",
            "unit name given twice: 'web', and 'web2' with --unit",
        ),
        (
            "--unit a --unit b --listen-stream 80 127.0.0.1:80",
            "option '--unit' given more than once",
        ),
        ("--unit web --listen-stream 80", "missing TARGET: give HOST:PORT or a unix socket path"),
        (
            "--unit '' --listen-stream 80 127.0.0.1:80",
            "invalid unit name '': use only letters, digits and ':', '-', '_', '.', '\\'",
        ),
        (
            "--unit web.service --listen-stream 80 127.0.0.1:80",
            "invalid unit name 'web.service': give it without '.service'",
        ),
        (
            "--unit w/b --listen-stream 80 127.0.0.1:80",
            "invalid unit name 'w/b': use only letters, digits and ':', '-', '_', '.', '\\'",
        ),
        (
            "-web --listen-stream 80 127.0.0.1:80",
            "unknown option '-web' (forkproxy's own options go after TARGET)",
        ),
    ],
)
def test_unit_naming_errors(command: str, message: str) -> None:
    assert refused(command) == message


# ---- listen addresses --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "listen_stream"),
    [
        ("[fe80::1%lo]:80", "[fe80::1]:80%%lo"),  # forkproxy's spelling
        ("[fe80::1]:80%lo", "[fe80::1]:80%%lo"),  # systemd.socket(5)'s
        ("[fe80::1%2]:80", "[fe80::1]:80%%2"),
        ("[fe80::abcd%enp0s31f6]:443", "[fe80::abcd]:443%%enp0s31f6"),
        ("[::1]:80", "[::1]:80"),
        ("80", "80"),
    ],
)
def test_scoped_ipv6_listen_addresses(address: str, listen_stream: str) -> None:
    files = units(["web", "--listen-stream", address, "127.0.0.1:80"])
    assert setting(files["web.socket"], "ListenStream") == [listen_stream]
    if address != "80":  # a bare port is no --metrics address
        files = units(["web", "--listen-stream", "81", "--metrics", address, "127.0.0.1:80"])
        assert setting(files["web-metrics.socket"], "ListenStream") == [listen_stream]


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("[fe80::1%]:80", "'%' is not an interface name or number"),
        ("[fe80::1]:80%", "'%' is not an interface name or number"),
        ("[fe80::1%a/b]:80", "'%a/b' is not an interface name or number"),
        ("[fe80::1%a:b]:80", "'%a:b' is not an interface name or number"),
        ("[fe80::1%abcdefghijklmnop]:80", "'%abcdefghijklmnop' is not an interface name"),
        ("[fe80::1%..]:80", "'%..' is not an interface name or number"),
        ("[fe80::1%lo]:80%lo", "give the scope once"),
        ("[fe80::1%lo]80", "expected [IPV6]:PORT, as in '[::1]:8080'"),
        ("127.0.0.1%lo:80", "'127.0.0.1%lo' is not an IPv4 address"),
    ],
)
def test_bad_scoped_listen_addresses(address: str, reason: str) -> None:
    message = refused(f"web --listen-stream '{address}' 127.0.0.1:80")
    assert message.startswith(f"invalid --listen-stream '{address}': {reason}")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--listen-stream 80 --listen-stream 80", "--listen-stream '80' is given twice"),
        (
            "--listen-stream 80 --listen-stream [::]:80",
            "--listen-stream '[::]:80' is the same address as --listen-stream '80'",
        ),
        (
            "--listen-stream [::1]:80 --listen-stream [0:0::1]:80",
            "--listen-stream '[0:0::1]:80' is the same address as --listen-stream '[::1]:80'",
        ),
        (
            "--listen-stream 127.0.0.1:80 --listen-stream [::ffff:127.0.0.1]:80",
            "--listen-stream '[::ffff:127.0.0.1]:80' is the same address as "
            "--listen-stream '127.0.0.1:80'",
        ),
        (
            "--listen-stream 80 --listen-stream 127.0.0.1:80",
            "--listen-stream '127.0.0.1:80' overlaps --listen-stream '80': a wildcard address "
            "listens on every address at port 80",
        ),
        (
            "--listen-stream [::1]:80 --listen-stream [::]:80",
            "--listen-stream '[::]:80' overlaps --listen-stream '[::1]:80': a wildcard address "
            "listens on every address at port 80",
        ),
        (
            "--listen-stream 0.0.0.0:80 --listen-stream 80",
            "--listen-stream '80' overlaps --listen-stream '0.0.0.0:80': a wildcard address "
            "listens on every address at port 80",
        ),
        (
            "--listen-unix /run/a --listen-unix /run/a",
            "--listen-unix '/run/a' is given twice",
        ),
        (
            "--listen-stream 127.0.0.1:80 --metrics 127.0.0.1:80",
            "--metrics '127.0.0.1:80' is the same address as --listen-stream '127.0.0.1:80'",
        ),
        (
            "--listen-stream 9100 --metrics 127.0.0.1:9100",
            "--metrics '127.0.0.1:9100' overlaps --listen-stream '9100': a wildcard address "
            "listens on every address at port 9100",
        ),
        (
            "--listen-unix @m --metrics @m",
            "--metrics '@m' is the same socket as --listen-unix '@m'",
        ),
        (
            "--listen-stream 80 --metrics 9100",
            "invalid --metrics '9100': give the address to listen on too, as in "
            "127.0.0.1:9100 (a bare port would listen on every interface)",
        ),
    ],
)
def test_listen_addresses_must_not_clash(flags: str, message: str) -> None:
    assert refused(f"web {flags} 127.0.0.1:1") == message


@pytest.mark.parametrize(
    "flags",
    [
        "--listen-stream 127.0.0.1:80 --listen-stream [::1]:80",
        "--listen-stream 0.0.0.0:80 --listen-stream [::1]:80",
        "--listen-stream 80 --listen-stream 81 --metrics 127.0.0.1:82",
        "--listen-stream [fe80::1%lo]:80 --listen-stream [fe80::1%eth0]:80",
        "--listen-unix /run/a --listen-unix @/run/a --metrics /run/m",
        "--listen-stream 80 --metrics [::1]:9100",
    ],
)
def test_distinct_listen_addresses(flags: str) -> None:
    parse_args(shlex.split(f"web {flags} 127.0.0.1:1"))


def test_bare_metrics_port_is_refused_like_forkproxy_does() -> None:
    from forkproxy.settings.address import parse_metrics

    with pytest.raises(ForkproxyError) as forkproxy:
        parse_metrics("9100")
    assert "a bare port would listen on every interface" in str(forkproxy.value)
    assert "a bare port would listen on every interface" in refused(
        "web --listen-stream 80 --metrics 9100 127.0.0.1:80"
    )


# ---- the default executable --------------------------------------------------------------


@pytest.mark.parametrize(
    ("program", "executable"),
    [
        ("/usr/bin/forkproxy-units", "/usr/bin/forkproxy"),
        ("/usr/local/bin/forkproxy-units", "/usr/local/bin/forkproxy"),
        ("/opt/forkproxy/bin/forkproxy-units", "/usr/local/bin/forkproxy"),
        ("", "/usr/local/bin/forkproxy"),
    ],
)
def test_default_executable_follows_where_forkproxy_units_is(program: str, executable: str) -> None:
    assert default_executable(program) == executable


@pytest.mark.skipif(os.path.realpath("/bin") != "/usr/bin", reason="/bin is not /usr/bin here")
def test_default_executable_through_the_bin_symlink() -> None:
    assert default_executable("/bin/forkproxy-units") == "/usr/bin/forkproxy"


def test_packaged_program_writes_usr_bin(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["web", "--listen-stream", "80", "127.0.0.1:80"]
    assert run(argv, "/usr/bin/forkproxy-units") == 0
    out = capsys.readouterr().out
    assert "ExecStart=/usr/bin/forkproxy 127.0.0.1:80" in out.splitlines()
    # The header's command gives the same units wherever forkproxy-units is installed.
    assert "#   forkproxy-units web --listen-stream 80 --executable /usr/bin/forkproxy" in out
    assert run([*argv[:3], "--executable", "/opt/fp", *argv[3:]], "/usr/bin/x") == 0
    assert "ExecStart=/opt/fp 127.0.0.1:80" in capsys.readouterr().out.splitlines()
    assert run(["web", "--user", *argv[1:]], "/usr/bin/forkproxy-units") == 0
    assert "ExecStart=%h/.local/bin/forkproxy 127.0.0.1:80" in capsys.readouterr().out


def test_console_script_passes_its_path(tmp_path: Path) -> None:
    # The same code run as /usr/bin's would be: argv[0] decides, not the module's place.
    script = "import sys; from forkproxy.units import main; sys.argv[0] = sys.argv[1]; "
    script += "del sys.argv[1]; main()"
    done = subprocess.run(
        [sys.executable, "-c", script, "/usr/bin/forkproxy-units", "web", "--listen-stream",
         "80", "127.0.0.1:80"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert "ExecStart=/usr/bin/forkproxy 127.0.0.1:80" in done.stdout.splitlines()


# ---- old spellings -----------------------------------------------------------------------


def test_upstream_unit_is_a_hidden_alias_of_target_unit() -> None:
    new = "web --listen-stream 80 --target-unit nginx.service --share-namespace 127.0.0.1:80"
    old = new.replace("--target-unit", "--upstream-unit")
    assert parse_args(shlex.split(old)) == parse_args(shlex.split(new))
    assert units(old) == units(new)  # the header's command says --target-unit
    assert "--target-unit nginx.service" in units(old)["web.service"]
    assert "--upstream-unit" not in USAGE
    assert "--target-unit UNIT" in USAGE
    twice = "web --listen-stream 80 --upstream-unit a.service --target-unit b.service 127.0.0.1:80"
    assert refused(twice) == "option '--target-unit' given more than once"
    assert refused("web --listen-stream 80 --upstream-unit") == (
        "option '--upstream-unit' needs a value"
    )


# ---- help --------------------------------------------------------------------------------


def test_help_ends_by_naming_the_man_page() -> None:
    assert USAGE.rstrip().splitlines()[-1] == (
        "See man forkproxy-units for the units, their sandbox and more examples."
    )
    assert "--unit NAME" in USAGE
