"""forkproxy-units: the generated sandbox lets every target and route through, and
ExecStart= runs forkproxy with the targets and options in the order given."""

import shlex

import pytest

from forkproxy.errors import ForkproxyError
from forkproxy.units.arguments import parse_args
from forkproxy.units.render import render


def service(command: str, file: str = "web.service") -> list[str]:
    return render(parse_args(shlex.split(command))[0])[file].splitlines()


def setting(lines: list[str], key: str) -> list[str]:
    """The values of `key=` lines, in order."""
    return [line.split("=", 1)[1] for line in lines if line.startswith(f"{key}=")]


# Targets (after '--'), then: RestrictAddressFamilies=, IPAddressDeny=, IPAddressAllow=,
# PrivateNetwork= of the system service.
SANDBOX = [
    (
        "127.0.0.1:9001 [::1]:9002 /run/app.sock",
        "AF_UNIX AF_INET AF_INET6", ["any"], ["127.0.0.1 ::1"], [],
    ),
    ("/run/app.sock 127.0.0.1:9001", "AF_UNIX AF_INET", ["any"], ["127.0.0.1"], []),
    ("/run/a.sock /run/b.sock", "AF_UNIX", ["any"], [], ["yes"]),
    ("/run/a.sock @b", "AF_UNIX", ["any"], [], []),  # @b lives in the host's namespace
    ("/run/a.sock vsock:3:1024", "AF_UNIX AF_VSOCK", ["any"], [], []),
    ("vsock:3:1024 [fe80::1%eth0]:80", "AF_UNIX AF_INET6 AF_VSOCK", ["any"], ["fe80::1"], []),
    ("10.0.0.1:80 10.0.0.2:80 10.0.0.1:81", "AF_UNIX AF_INET", ["any"], ["10.0.0.1 10.0.0.2"], []),
    # A host name is resolved when connecting: any address, either family.
    ("127.0.0.1:80 backend.example:443", "AF_UNIX AF_INET AF_INET6", [], [], []),
    ("/run/a.sock backend.example:443", "AF_UNIX AF_INET AF_INET6", [], [], []),
    # Routes' targets count as much as the others.
    (
        "127.0.0.1:80 --route admin=[::1]:8081 --route=admin=vsock:2:9",
        "AF_UNIX AF_INET AF_INET6 AF_VSOCK", ["any"], ["127.0.0.1 ::1"], [],
    ),
    ("/run/a.sock --route admin=/run/b.sock", "AF_UNIX", ["any"], [], ["yes"]),
    ("/run/a.sock --route admin=@b", "AF_UNIX", ["any"], [], []),
    ("/run/a.sock --route admin=10.1.2.3:80", "AF_UNIX AF_INET", ["any"], ["10.1.2.3"], []),
    ("/run/a.sock --route admin=db.example:5432", "AF_UNIX AF_INET AF_INET6", [], [], []),
]  # fmt: skip


@pytest.mark.parametrize(("targets", "families", "deny", "allow", "private"), SANDBOX)
def test_sandbox_fits_every_target(
    targets: str, families: str, deny: list[str], allow: list[str], private: list[str]
) -> None:
    got = service(f"web --listen-stream 80 -- {targets}")
    assert setting(got, "RestrictAddressFamilies") == [families]
    assert setting(got, "IPAddressDeny") == deny
    assert setting(got, "IPAddressAllow") == allow
    assert setting(got, "PrivateNetwork") == private


def test_host_name_target_says_why_any_address_is_allowed() -> None:
    got = service("web --listen-stream 80 -- 127.0.0.1:80 backend.example:443")
    comment = "# backend.example:443 is resolved when connecting, so any IP address may be needed"
    assert any(line.startswith(comment) for line in got)


@pytest.mark.parametrize(
    "targets", ["127.0.0.1:9001 [::1]:9002 /run/app.sock", "/run/a.sock vsock:3:1024", "@a @b"]
)
def test_user_units_restrict_families_but_not_addresses(targets: str) -> None:
    got = service(f"web --user --listen-stream 8080 -- {targets}")
    assert setting(got, "RestrictAddressFamilies")
    assert not setting(got, "IPAddressDeny") and not setting(got, "PrivateNetwork")


def test_shared_namespace_with_several_targets() -> None:
    got = service(
        "web --listen-stream 80 --target-unit nginx.service --share-namespace "
        "-- /run/a.sock /run/b.sock"
    )
    assert setting(got, "PrivateNetwork") == ["yes"]
    assert setting(got, "JoinsNamespaceOf") == ["nginx.service"]


@pytest.mark.parametrize(
    ("words", "exec_start"),
    [
        (
            "127.0.0.1:9001 [::1]:9002 /run/app.sock",
            "127.0.0.1:9001 [::1]:9002 /run/app.sock",
        ),
        (
            "/run/b.sock -c 10 127.0.0.1:1 --route admin=/run/a.sock -w 2 [::1]:2",
            "/run/b.sock -c 10 127.0.0.1:1 --route admin=/run/a.sock -w 2 [::1]:2",
        ),
        ("10.0.0.2:80 10.0.0.1:80 -- 10.0.0.3:80", "10.0.0.2:80 10.0.0.1:80 -- 10.0.0.3:80"),
    ],
)
def test_exec_start_keeps_targets_and_options_in_order(words: str, exec_start: str) -> None:
    got = service(f"web --listen-stream 80 -- {words}")
    assert setting(got, "ExecStart") == [f"/usr/local/bin/forkproxy {exec_start}"]


def test_description_names_every_target() -> None:
    files = render(parse_args(shlex.split("web --listen-stream 80 -- 127.0.0.1:1 /run/a"))[0])
    assert "Description=forkproxy relay to 127.0.0.1:1, /run/a" in files["web.service"]
    assert "Description=forkproxy relay to 127.0.0.1:1, /run/a (socket)" in files["web.socket"]


@pytest.mark.parametrize(
    ("targets", "where"),
    [
        ("/tmp/app.sock", "/tmp/"),
        ("127.0.0.1:80 /var/tmp/app/s", "/var/tmp/"),
        ("127.0.0.1:80 --route admin=/tmp//x", "/tmp/"),
        ("/run/../tmp/x", "/tmp/"),
    ],
)
def test_socket_files_in_the_private_tmp_are_refused(targets: str, where: str) -> None:
    """DynamicUser=yes implies PrivateTmp=yes, which nothing turns off: the service could
    never reach them."""
    with pytest.raises(ForkproxyError) as raised:
        parse_args(shlex.split(f"web --listen-stream 80 -- {targets}"))
    assert f"is in {where}, which is private to the service" in str(raised.value)
    parse_args(shlex.split(f"web --user --listen-stream 8080 -- {targets}"))  # not private


@pytest.mark.parametrize(
    ("targets", "protect_home"),
    [
        ("/run/app.sock", "yes"),
        ("/home/app/s.sock", "read-only"),
        ("127.0.0.1:80 --route admin=/root/s", "read-only"),
        ("/run/user/1000/app.sock", "read-only"),
        ("/homework/s", "yes"),
    ],
)
def test_socket_files_in_home_directories_stay_reachable(targets: str, protect_home: str) -> None:
    got = service(f"web --listen-stream 80 -- {targets}")
    assert setting(got, "ProtectHome") == [protect_home]
