"""forkproxy-units: flags to unit text, its errors, ExecStart= quoting, and the shipped files."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from forkproxy.errors import ForkproxyError
from forkproxy.units import run
from forkproxy.units.arguments import USAGE, canonical_args, parse_args
from forkproxy.units.checks import forkproxy_config
from forkproxy.units.render import FDS_SPARE, limit_nofile, quote_exec_arg, render
from tests.support.systemd_regenerate import SHIPPED, split_shipped


def units(command: str) -> dict[str, str]:
    return render(parse_args(shlex.split(command))[0])


def lines(command: str, file: str) -> list[str]:
    return units(command)[file].splitlines()


# ---- good flags -------------------------------------------------------------------------

GOOD = [
    ("web --listen-stream 80 -- 127.0.0.1:8080", "web.socket", ["ListenStream=80"]),
    (
        "web --listen-stream 127.0.0.1:80 --listen-stream [::1]:80 127.0.0.1:8080",
        "web.socket",
        ["ListenStream=127.0.0.1:80", "ListenStream=[::1]:80"],
    ),
    (
        "web --listen-unix /run/web/web.sock --listen-unix @web --socket-user www-data "
        "--socket-group 33 --socket-mode 660 --backlog 512 127.0.0.1:8080",
        "web.socket",
        [
            "ListenStream=/run/web/web.sock",
            "ListenStream=@web",
            "SocketUser=www-data",
            "SocketGroup=33",
            "SocketMode=0660",
            "Backlog=512",
        ],
    ),
    (
        "web --listen-unix /run/100%/s 127.0.0.1:8080",
        "web.socket",
        ["ListenStream=/run/100%%/s"],
    ),
    (
        "web --accept --max-connections 10 --listen-stream=80 127.0.0.1:8080",
        "web.socket",
        ["Accept=yes", "MaxConnections=10"],
    ),
    (
        "web --accept --listen-stream 80 127.0.0.1:8080",
        "web@.service",
        [
            "Type=exec",
            "ExecStart=/usr/local/bin/forkproxy 127.0.0.1:8080",
            "CollectMode=inactive-or-failed",
            "Description=forkproxy relay to 127.0.0.1:8080 (connection %i)",
        ],
    ),
    (
        "web --listen-stream 80 --description 'Web: 100% up' 127.0.0.1:8080",
        "web.service",
        ["Description=Web: 100%% up"],
    ),
    (
        "web --listen-stream 80 --description 'Web: 100% up' 127.0.0.1:8080",
        "web.socket",
        ["Description=Web: 100%% up (socket)"],
    ),
    (
        "web --listen-stream 80 --metrics 127.0.0.1:9100 127.0.0.1:8080",
        "web-metrics.socket",
        ["ListenStream=127.0.0.1:9100", "FileDescriptorName=metrics", "Service=web.service"],
    ),
    (
        "web --listen-stream 80 --metrics /run/web-metrics.sock 127.0.0.1:8080",
        "web.service",
        ["Requires=web.socket", "After=web.socket", "Requires=web-metrics.socket"],
    ),
    (
        "web --listen-stream 80 --target-unit nginx.service --share-namespace 127.0.0.1:80",
        "web.service",
        [
            "Requires=nginx.service",
            "After=nginx.service",
            "JoinsNamespaceOf=nginx.service",
            "PrivateNetwork=yes",
        ],
    ),
    (
        "web --listen-stream 80 --executable /opt/forkproxy/bin/forkproxy 127.0.0.1:8080 -w 4",
        "web.service",
        ["ExecStart=/opt/forkproxy/bin/forkproxy 127.0.0.1:8080 -w 4"],
    ),
    (
        "web --listen-stream 80 -- 127.0.0.1:8080 --exit-idle-time='5min 20s'",
        "web.service",
        ['ExecStart=/usr/local/bin/forkproxy 127.0.0.1:8080 "--exit-idle-time=5min 20s"'],
    ),
    (
        "web --listen-stream 80 -- [fe80::1%eth0]:8080",
        "web.service",
        [
            "ExecStart=/usr/local/bin/forkproxy [fe80::1%%eth0]:8080",
            "RestrictAddressFamilies=AF_UNIX AF_INET6",
            "IPAddressAllow=fe80::1",
        ],
    ),
    (
        "'w:x\\y_z.1' --listen-stream 80 127.0.0.1:8080",
        "w:x\\y_z.1.service",
        ["Requires=w:x\\y_z.1.socket"],
    ),
]


@pytest.mark.parametrize(("command", "file", "expected"), GOOD)
def test_good_flags(command: str, file: str, expected: list[str]) -> None:
    got = lines(command, file)
    for line in expected:
        assert line in got


@pytest.mark.parametrize("command", sorted({command for command, _, _ in GOOD}))
def test_header_command_renders_the_same_units(command: str) -> None:
    request, _ = parse_args(shlex.split(command))
    assert parse_args(canonical_args(request))[0] == request
    for text in render(request).values():
        header = text.splitlines()[2]
        assert header == "#   " + shlex.join(["forkproxy-units", *canonical_args(request)])


def test_file_names() -> None:
    assert list(units("web --listen-stream 80 127.0.0.1:80")) == ["web.socket", "web.service"]
    assert list(units("web --listen-stream 80 --accept 127.0.0.1:80")) == [
        "web.socket",
        "web@.service",
    ]
    assert list(units("web --listen-stream 80 --metrics 127.0.0.1:9100 127.0.0.1:80")) == [
        "web.socket",
        "web-metrics.socket",
        "web.service",
    ]


# ---- hardening and network access per target --------------------------------------------

NETWORK = [
    ("127.0.0.1:80", ["RestrictAddressFamilies=AF_UNIX AF_INET", "IPAddressAllow=127.0.0.1"], []),
    ("[::1]:80", ["RestrictAddressFamilies=AF_UNIX AF_INET6", "IPAddressAllow=::1"], []),
    (
        "backend.example:443",
        ["RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"],
        ["IPAddressDeny=any", "PrivateNetwork=yes"],
    ),
    (
        "/run/app.sock",
        ["RestrictAddressFamilies=AF_UNIX", "IPAddressDeny=any", "PrivateNetwork=yes"],
        [],
    ),
    ("@app", ["RestrictAddressFamilies=AF_UNIX", "IPAddressDeny=any"], ["PrivateNetwork=yes"]),
    (
        "vsock:3:1024",
        ["RestrictAddressFamilies=AF_UNIX AF_VSOCK", "IPAddressDeny=any"],
        ["PrivateNetwork=yes", "RestrictAddressFamilies=AF_UNIX"],
    ),
]


@pytest.mark.parametrize(("target", "present", "absent"), NETWORK)
def test_network_access_follows_the_target(
    target: str, present: list[str], absent: list[str]
) -> None:
    got = lines(f"web --listen-stream 80 -- {target}", "web.service")
    for line in present:
        assert line in got
    for line in absent:
        assert line not in got


def test_system_service_is_hardened() -> None:
    got = lines("web --listen-stream 80 127.0.0.1:80", "web.service")
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "LimitNOFILE=2048",
    ]:
        assert line in got
    assert "PrivateIPC=yes" not in got and "RemoveIPC=no" not in got


def test_user_units_need_no_privileges() -> None:
    files = units("web --user --listen-stream 8080 127.0.0.1:80")
    service = files["web.service"].splitlines()
    assert "ExecStart=%h/.local/bin/forkproxy 127.0.0.1:80" in service
    assert "NoNewPrivileges=yes" in service
    assert "SystemCallFilter=@system-service" in service
    for privileged in ("DynamicUser=", "CapabilityBoundingSet=", "ProtectSystem=", "IPAddress"):
        assert not any(line.startswith(privileged) for line in service)
    assert "WantedBy=sockets.target" in files["web.socket"].splitlines()


@pytest.mark.parametrize(
    ("options", "limit"),
    [
        ("", 2048),  # 6 x 256 + 160
        ("-c 1", 1024),
        ("-c1000", 7168),
        ("--connections-max=5000", 30720),
        ("--connections-max 1024 -w 8", 7168),
        ("--conn=1024", 7168),  # forkproxy takes unambiguous prefixes
        ("-c 10 -c 144", 1024),  # the last one wins; 6 x 144 + 160 = 1024
    ],
)
def test_limit_nofile_covers_the_connection_cap(options: str, limit: int) -> None:
    request, _ = parse_args(["web", "--listen-stream", "80", "127.0.0.1:80", *options.split()])
    assert limit_nofile(forkproxy_config(request)) == limit
    assert f"LimitNOFILE={limit}" in render(request)["web.service"].splitlines()


def test_fd_spare_covers_what_the_master_reserves() -> None:
    from forkproxy.supervisor.limits import FD_RESERVE

    assert FDS_SPARE >= FD_RESERVE


@pytest.mark.parametrize(
    ("options", "line"),
    [
        ("", "WatchdogSec=90s"),
        ("--worker-timeout=1min", "WatchdogSec=180s"),
        ("--worker-timeout=1.5", "WatchdogSec=5s"),
        ("--worker-timeout=infinity", None),
    ],
)
def test_watchdog_outlasts_three_worker_timeouts(options: str, line: str | None) -> None:
    got = lines(f"web --listen-stream 80 127.0.0.1:80 {options}", "web.service")
    assert [x for x in got if x.startswith("WatchdogSec=")] == ([line] if line else [])


# ---- bad flags --------------------------------------------------------------------------

BAD = [
    (
        "",
        "missing unit NAME (see 'forkproxy-units --help')",
    ),
    (
        "--listen-stream 80",
        "missing unit NAME (see 'forkproxy-units --help')",
    ),
    (
        "web --listen-stream 80",
        "missing TARGET: give HOST:PORT or a unix socket path",
    ),
    (
        "-- x",
        "missing unit NAME before '--'",
    ),
    (
        "web --listen-stream 80 --bogus 1 127.0.0.1:80",
        "unknown option '--bogus' (forkproxy's own options go after TARGET)",
    ),
    (
        "web --listen-stream 80 --workers=4 127.0.0.1:80",
        "unknown option '--workers' (forkproxy's own options go after TARGET)",
    ),
    (
        "web --listen-stream",
        "option '--listen-stream' needs a value",
    ),
    (
        "web --accept=yes --listen-stream 80 127.0.0.1:80",
        "option '--accept' takes no value",
    ),
    (
        "web --backlog 1 --backlog 2 --listen-stream 80 127.0.0.1:80",
        "option '--backlog' given more than once",
    ),
    (
        "web 127.0.0.1:80",
        "nothing to listen on: give --listen-stream, --listen-unix, --listen-datagram, "
        "--listen-unix-datagram or --listen-sequential-packet",
    ),
    (
        "web.service --listen-stream 80 127.0.0.1:80",
        "invalid unit name 'web.service': give it without '.service'",
    ),
    (
        "web.socket --listen-stream 80 127.0.0.1:80",
        "invalid unit name 'web.socket': give it without '.socket'",
    ),
    (
        "we@b --listen-stream 80 127.0.0.1:80",
        "invalid unit name 'we@b': '@' is not allowed (forkproxy-units adds it with --accept)",
    ),
    (
        "'we b' --listen-stream 80 127.0.0.1:80",
        "invalid unit name 'we b': use only letters, digits and ':', '-', '_', '.', '\\'",
    ),
    (
        "wéb --listen-stream 80 127.0.0.1:80",
        "invalid unit name 'wéb': use only letters, digits and ':', '-', '_', '.', '\\'",
    ),
    (
        "a" * 248 + " --listen-stream 80 --metrics 127.0.0.1:9100 127.0.0.1:80",
        "unit name '" + "a" * 248 + "-metrics.socket' is longer than 255 characters",
    ),
    (
        "web --listen-stream 80 127.0.0.1:99999",
        "invalid target '127.0.0.1:99999': port 99999 is not in 1-65535",
    ),
    (
        "web --listen-stream 80 ::1:80",
        "invalid target '::1:80': write IPv6 addresses in brackets, as in '[::1]:80'",
    ),
    (
        "web --listen-stream 80 'bad host:80'",
        "invalid target 'bad host:80': 'bad host' is not a host name or address",
    ),
    (
        "web --listen-stream 80 ''",
        "empty target: give HOST:PORT or a unix socket path",
    ),
    (
        ["web", "--listen-stream", "80", "/run/a\nb"],
        "invalid target '/run/a\\nb': control characters are not allowed",
    ),
    (
        "web --listen-stream 0 127.0.0.1:80",
        "invalid --listen-stream '0': port '0' is not a number in 1-65535",
    ),
    (
        "web --listen-stream 65536 127.0.0.1:80",
        "invalid --listen-stream '65536': port '65536' is not a number in 1-65535",
    ),
    (
        "web --listen-stream http 127.0.0.1:80",
        "invalid --listen-stream 'http': port 'http' is not a number in 1-65535",
    ),
    (
        "web --listen-stream 080 127.0.0.1:80",
        "invalid --listen-stream '080': port '080' is not a number in 1-65535",
    ),
    (
        "web --listen-stream 127.0.0.1: 127.0.0.1:80",
        "invalid --listen-stream '127.0.0.1:': port '' is not a number in 1-65535",
    ),
    (
        "web --listen-stream localhost:80 127.0.0.1:80",
        (
            "invalid --listen-stream 'localhost:80': 'localhost' is not an IPv4 address "
            "(write PORT, IPV4:PORT or [IPV6]:PORT)"
        ),
    ),
    (
        "web --listen-stream 1.2.3:80 127.0.0.1:80",
        (
            "invalid --listen-stream '1.2.3:80': '1.2.3' is not an IPv4 address (write PORT, "
            "IPV4:PORT or [IPV6]:PORT)"
        ),
    ),
    (
        "web --listen-stream [::1]80 127.0.0.1:80",
        "invalid --listen-stream '[::1]80': expected [IPV6]:PORT, as in '[::1]:8080'",
    ),
    (
        "web --listen-stream [1.2.3.4]:80 127.0.0.1:80",
        "invalid --listen-stream '[1.2.3.4]:80': expected [IPV6]:PORT, as in '[::1]:8080'",
    ),
    (
        "web --listen-stream [fe80::1%]:80 127.0.0.1:80",
        (
            "invalid --listen-stream '[fe80::1%]:80': '%' is not an interface name or number "
            "(at most 15 characters, none of ':', '/', '%', space)"
        ),
    ),
    (
        "web --listen-stream /run/x 127.0.0.1:80",
        "invalid --listen-stream '/run/x': use --listen-unix for unix sockets",
    ),
    (
        "web --listen-unix run/x 127.0.0.1:80",
        "invalid --listen-unix 'run/x': give an absolute /path or an @name",
    ),
    (
        "web --listen-unix / 127.0.0.1:80",
        "invalid --listen-unix '/': no socket name after '/'",
    ),
    (
        "web --listen-unix @ 127.0.0.1:80",
        "invalid --listen-unix '@': no socket name after '@'",
    ),
    (
        "web --listen-unix /" + "a" * 107 + " 127.0.0.1:80",
        "invalid --listen-unix '/" + "a" * 107 + "': longer than 107 bytes",
    ),
    (
        "web --listen-unix '/run/x ' 127.0.0.1:80",
        "invalid --listen-unix '/run/x ': no control characters, edge spaces or final '\\'",
    ),
    (
        "web --listen-unix /run/x --socket-mode 999 127.0.0.1:80",
        "invalid --socket-mode '999': expected octal, as in 0660",
    ),
    (
        "web --listen-unix /run/x --socket-mode 0o660 127.0.0.1:80",
        "invalid --socket-mode '0o660': expected octal, as in 0660",
    ),
    (
        "web --listen-unix /run/x --socket-mode 17777 127.0.0.1:80",
        "invalid --socket-mode '17777': expected octal, as in 0660",
    ),
    (
        "web --listen-stream 80 --socket-mode 0660 127.0.0.1:80",
        "--socket-mode applies to socket files only: add --listen-unix /PATH",
    ),
    (
        "web --listen-unix @x --socket-user www 127.0.0.1:80",
        "--socket-user applies to socket files only: add --listen-unix /PATH",
    ),
    (
        "web --listen-unix /run/x --socket-user 9www 127.0.0.1:80",
        (
            "invalid --socket-user '9www': a name of letters, digits, '_' and '-' "
            "(not starting with a digit or '-', at most 31) or a numeric id"
        ),
    ),
    (
        "web --listen-unix /run/x --socket-group 'a b' 127.0.0.1:80",
        (
            "invalid --socket-group 'a b': a name of letters, digits, '_' and '-' "
            "(not starting with a digit or '-', at most 31) or a numeric id"
        ),
    ),
    (
        "web --listen-stream 80 --backlog 0 127.0.0.1:80",
        "invalid --backlog '0': expected an integer in 1-4294967295",
    ),
    (
        "web --listen-stream 80 --backlog -1 127.0.0.1:80",
        "invalid --backlog '-1': expected an integer in 1-4294967295",
    ),
    (
        "web --listen-stream 80 --backlog 4294967296 127.0.0.1:80",
        "invalid --backlog '4294967296': expected an integer in 1-4294967295",
    ),
    (
        "web --listen-stream 80 --max-connections 5 127.0.0.1:80",
        (
            "--max-connections needs --accept; without it, pass --connections-max=N to forkproxy "
            "after TARGET"
        ),
    ),
    (
        "web --listen-stream 80 --accept --max-connections x 127.0.0.1:80",
        "invalid --max-connections 'x': expected an integer in 1-4294967295",
    ),
    (
        "web --listen-stream 80 --accept --metrics 127.0.0.1:9100 127.0.0.1:80",
        "--metrics cannot be used with --accept: an instance serves one connection",
    ),
    (
        "web --listen-stream 80 --accept 127.0.0.1:80 -c 5",
        (
            "forkproxy option '--connections-max' means nothing with --accept: use "
            "--max-connections (MaxConnections=), which caps the instances"
        ),
    ),
    (
        "web --listen-stream 80 --metrics localhost:9100 127.0.0.1:80",
        (
            "invalid --metrics 'localhost:9100': 'localhost' is not an IPv4 address (write PORT, "
            "IPV4:PORT or [IPV6]:PORT)"
        ),
    ),
    (
        "web --listen-stream 80 --share-namespace 127.0.0.1:80",
        "--share-namespace needs --target-unit: whose namespace to join",
    ),
    (
        "web --listen-stream 80 --target-unit nginx 127.0.0.1:80",
        "invalid --target-unit 'nginx': expected a unit name such as nginx.service",
    ),
    (
        "web --listen-stream 80 --target-unit foo@.service 127.0.0.1:80",
        "invalid --target-unit 'foo@.service': expected a unit name such as nginx.service",
    ),
    (
        "web --user --listen-unix /run/x --socket-group g 127.0.0.1:80",
        (
            "--socket-user and --socket-group cannot be used with --user: a user manager cannot "
            "change socket ownership"
        ),
    ),
    (
        "web --user --listen-stream 80 --target-unit n.service --share-namespace 127.0.0.1:80",
        "--share-namespace cannot be used with --user",
    ),
    (
        "web --listen-stream 80 --description '' 127.0.0.1:80",
        "invalid --description '': one line of text, no edge spaces or final '\\'",
    ),
    (
        "web --listen-stream 80 --description ' x' 127.0.0.1:80",
        "invalid --description ' x': one line of text, no edge spaces or final '\\'",
    ),
    (
        ["web", "--listen-stream", "80", "--description", "a\nb", "127.0.0.1:80"],
        "invalid --description 'a\\nb': one line of text, no edge spaces or final '\\'",
    ),
    (
        "web --listen-stream 80 --executable forkproxy 127.0.0.1:80",
        (
            "invalid --executable 'forkproxy': an absolute path of letters, digits and '_', '.', "
            "'+', '@', ':', '-'"
        ),
    ),
    (
        "web --listen-stream 80 --executable '/opt/my app/forkproxy' 127.0.0.1:80",
        (
            "invalid --executable '/opt/my app/forkproxy': an absolute path of letters, digits and "
            "'_', '.', '+', '@', ':', '-'"
        ),
    ),
    (
        "web --listen-stream 80 --executable /opt/fp/ 127.0.0.1:80",
        (
            "invalid --executable '/opt/fp/': an absolute path of letters, digits and "
            "'_', '.', '+', '@', ':', '-'"
        ),
    ),
    (
        "web --listen-stream 80 --force 127.0.0.1:80",
        "--force needs --output-dir",
    ),
    (
        "web --listen-stream 80 127.0.0.1:80 -c 0",
        "forkproxy would not start: --connections-max= must be at least 1, got 0",
    ),
    (
        "web --listen-stream 80 127.0.0.1:80 -cx",
        "forkproxy would not start: invalid --connections-max= value 'x': expected a whole number",
    ),
    (
        "web --listen-stream 80 127.0.0.1:80 --worker-timeout=5minutess",
        (
            "forkproxy would not start: invalid --worker-timeout= value '5minutess': "
            "unknown unit 'minutess'"
        ),
    ),
    (
        "web --listen-stream 80 127.0.0.1:80 --listen 8080",
        (
            "forkproxy option '--listen' would bypass the socket unit: use --listen-stream or "
            "--listen-unix"
        ),
    ),
    (
        "web --listen-stream 80 127.0.0.1:80 -l8080",
        (
            "forkproxy option '--listen' would bypass the socket unit: use --listen-stream or "
            "--listen-unix"
        ),
    ),
    (
        "web --listen-stream 80 127.0.0.1:80 --metrics=9100",
        (
            "option '--metrics' after TARGET would go to forkproxy: give the forkproxy-units "
            "flags before TARGET"
        ),
    ),
    (
        "web --listen-stream 80 127.0.0.1:80 --list=8080",  # no abbreviation of --listen
        "forkproxy would not start: unrecognized arguments: --list=8080",
    ),
    (
        "web --listen-stream 80 127.0.0.1:80 --bogus",
        "forkproxy would not start: unrecognized arguments: --bogus",
    ),
    (
        "web --listen-stream 80 127.0.0.1:80 --vers",
        "forkproxy would not start: --help and --version only print and exit",
    ),
    (
        "web 127.0.0.1:80 --listen-stream 80",
        (
            "option '--listen-stream' after TARGET would go to forkproxy: give the "
            "forkproxy-units flags before TARGET"
        ),
    ),
    (
        "web --listen-unix /run/x 127.0.0.1:80 --socket-mode=0660",
        (
            "option '--socket-mode' after TARGET would go to forkproxy: give the "
            "forkproxy-units flags before TARGET"
        ),
    ),
    (
        "web --listen-stream 80 127.0.0.1:80 --inetd",
        "forkproxy option '--inetd' would bypass the socket unit: use --accept",
    ),
    (
        ["web", "--listen-stream", "80", "127.0.0.1:80", "tab\there"],
        "forkproxy option 'tab\\there' contains a control character",
    ),
]


@pytest.mark.parametrize(("command", "message"), BAD)
def test_bad_flags(command: str | list[str], message: str) -> None:
    """`command` is shell words, or a list where an argument holds a control character."""
    with pytest.raises(ForkproxyError) as raised:
        parse_args(shlex.split(command) if isinstance(command, str) else command)
    assert str(raised.value) == message


def test_non_utf8_argument() -> None:
    bad = b"/run/\xff".decode("utf-8", "surrogateescape")
    with pytest.raises(ForkproxyError, match="is not valid UTF-8"):
        parse_args(["web", "--listen-stream", "80", bad])


# ---- ExecStart= quoting -----------------------------------------------------------------

QUOTING = [
    ("127.0.0.1:8080", "127.0.0.1:8080"),
    ("[::1]:80", "[::1]:80"),
    ("/run/nginx/socket", "/run/nginx/socket"),
    ("@abstract", "@abstract"),
    ("--exit-idle-time=5min", "--exit-idle-time=5min"),
    ("-c", "-c"),
    ("5min 20s", '"5min 20s"'),
    ("100%", "100%%"),
    ("%n", "%%n"),
    ("$HOME", "$$HOME"),
    ("${HOME}", '"$${HOME}"'),
    ("a%$b c", '"a%%$$b c"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("it's", '"it\'s"'),
    ("back\\slash", '"back\\\\slash"'),
    ("trailing\\", '"trailing\\\\"'),
    (";", '";"'),
    ("\\;", '"\\\\;"'),
    ("", '""'),
    ("tab\there", '"tab\\there"'),
    ("new\nline", '"new\\nline"'),
    ("\x01\x7f", '"\\x01\\x7f"'),
    ("ünï", '"ünï"'),
]


@pytest.mark.parametrize(("arg", "quoted"), QUOTING)
def test_quote_exec_arg(arg: str, quoted: str) -> None:
    assert quote_exec_arg(arg) == quoted


def test_exec_start_keeps_the_order_given() -> None:
    got = lines("web --listen-stream 80 -- /run/a -c 10 --exit-idle-time '1 min'", "web.service")
    assert 'ExecStart=/usr/local/bin/forkproxy /run/a -c 10 --exit-idle-time "1 min"' in got


# ---- the program ------------------------------------------------------------------------


def test_dry_run_prints_every_file_under_a_header(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["web", "--listen-stream", "80", "127.0.0.1:80"]) == 0
    out = capsys.readouterr().out
    files = units("web --listen-stream 80 127.0.0.1:80")
    socket, service = files["web.socket"], files["web.service"]
    assert out == f"==> web.socket <==\n{socket}\n==> web.service <==\n{service}"


def test_errors_are_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["web", "--listen-stream", "80"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "forkproxy-units: missing TARGET: give HOST:PORT or a unix socket path\n"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["web", flag]) == 0
    assert capsys.readouterr().out == USAGE


def test_help_after_target_belongs_to_forkproxy(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["web", "--listen-stream", "80", "127.0.0.1:80", "--help"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "forkproxy-units: forkproxy would not start: --help and --version only print and exit\n"
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from forkproxy import __version__

    assert run(["--version"]) == 0
    assert capsys.readouterr().out == f"forkproxy-units {__version__}\n"


def test_output_dir_writes_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "units"
    argv = ["web", "--listen-stream", "80", "--output-dir", str(out), "127.0.0.1:80"]
    assert run(argv) == 0
    files = units("web --listen-stream 80 127.0.0.1:80")
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    for name, text in files.items():
        assert (out / name).read_text() == text
        assert (out / name).stat().st_mode & 0o777 == 0o644
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"wrote {out / 'web.socket'}",
        f"wrote {out / 'web.service'}",
        "next: systemctl daemon-reload && systemctl enable --now web.socket",
    ]


def test_output_dir_replaces_nothing_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "web.service").write_text("mine\n")
    argv = ["web", "--listen-stream", "80", "--output-dir", str(tmp_path), "127.0.0.1:80"]
    assert run(argv) == 1
    assert capsys.readouterr().err == (
        f"forkproxy-units: '{tmp_path / 'web.service'}' exists: remove it or pass --force\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.service"]  # all or nothing
    assert run([*argv, "--force"]) == 1
    assert capsys.readouterr().err == (
        "forkproxy-units: option '--force' after TARGET would go to forkproxy: "
        "give the forkproxy-units flags before TARGET\n"
    )
    assert run(["--force", *argv]) == 0
    assert (tmp_path / "web.service").read_text() != "mine\n"


def test_output_dir_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    argv = ["web", "--listen-stream", "80", "--output-dir", str(tmp_path / "file"), "::1"]
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("forkproxy-units: invalid target '::1'") and err.count("\n") == 1
    argv[-1] = "127.0.0.1:80"
    assert run(argv) == 1
    assert capsys.readouterr().err == (
        f"forkproxy-units: cannot create directory '{tmp_path / 'file'}': File exists\n"
    )


def test_console_script_exits_1_without_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from forkproxy.units import main; main()", "web", "--nope"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        "forkproxy-units: unknown option '--nope' (forkproxy's own options go after TARGET)\n"
    )


# ---- the shipped files are the generator's output ---------------------------------------


def shipped_units() -> list[Path]:
    return sorted(p for p in SHIPPED.iterdir() if p.suffix in (".socket", ".service"))


@pytest.mark.parametrize("path", shipped_units(), ids=lambda p: p.name)
def test_shipped_unit_is_generated(path: Path) -> None:
    """A shipped unit is a comment saying what it is for, then exactly what its recorded
    forkproxy-units command prints: the hardening is defined once, in forkproxy/units/render.py.
    After changing that, run `python -m tests.support.systemd_regenerate`."""
    text = path.read_text()
    comment, args = split_shipped(text)
    assert comment.strip() and all(
        line.startswith("#") or not line for line in comment.splitlines()
    )
    assert text == comment + render(parse_args(args)[0])[path.name], (
        f"{path.name} is not the output of: forkproxy-units {shlex.join(args)}; "
        "run python -m tests.support.systemd_regenerate"
    )
