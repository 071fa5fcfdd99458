"""Generated units started by a real systemd (tests/support/systemd_boot.py), with their
whole sandbox applied: they relay to every target, each when it is the only one up."""

import os
import shlex
import socket
from collections.abc import Iterator

import pytest

from forkproxy.units.arguments import parse_args
from forkproxy.units.render import render
from tests.support.proxy import wait_until
from tests.support.systemd_boot import BootedSystemd

ACCEPTANCE = "web --listen-stream 8080 -- 127.0.0.1:9001 [::1]:9002 /run/app.sock"
TARGETS = ["127.0.0.1:9001", "[::1]:9002", "/run/app.sock"]
CLIENT_TIMEOUT = 30.0  # seconds; a first connection starts forkproxy


def generate(command: str) -> dict[str, str]:
    return render(parse_args(shlex.split(command))[0])


def exchange(
    booted: BootedSystemd, target: socket.socket, source: str = "127.0.0.1", port: int = 8080
) -> bytes:
    """A client (inside, from `source`) through the unit to `target`: bytes both ways.
    Returns what the client got back."""
    target.settimeout(CLIENT_TIMEOUT)
    with booted.socket(socket.AF_INET, bind=[source, 0]) as client:
        client.settimeout(CLIENT_TIMEOUT)
        client.connect(("127.0.0.1", port))
        connection, _ = target.accept()
        with connection:
            connection.settimeout(CLIENT_TIMEOUT)
            payload = os.urandom(64 * 1024)
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := connection.recv(65536):
                received += chunk
            assert received == payload
            connection.sendall(b"reply from " + target_name(target).encode())
        return read_all(client)


def read_all(client: socket.socket) -> bytes:
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    return data


def target_name(listener: socket.socket) -> str:
    address = listener.getsockname()
    if listener.family == socket.AF_UNIX:
        return str(address)
    if listener.family == socket.AF_INET6:
        return f"[{address[0]}]:{address[1]}"
    return f"{address[0]}:{address[1]}"


@pytest.fixture
def web(systemd_boot: BootedSystemd) -> Iterator[BootedSystemd]:
    systemd_boot.install(generate(ACCEPTANCE))
    systemd_boot.systemctl("start", "web.socket")
    try:
        yield systemd_boot
    finally:
        print(systemd_boot.journal("web.socket", "web.service"))


def test_generated_units_relay_to_each_target_alone(web: BootedSystemd) -> None:
    for target in TARGETS:
        with web.listener(target) as listener:  # the only target up
            assert exchange(web, listener) == f"reply from {target}".encode()
    status = web.systemctl("show", "web.service", "-p", "ActiveState,SubState").stdout.split()
    assert status == ["ActiveState=active", "SubState=running"]
    assert "Address family not supported" not in web.journal("web.service")


def test_passed_sockets_are_not_subject_to_the_ip_allow_list(web: BootedSystemd) -> None:
    """A client from 127.0.0.2, which IPAddressAllow= does not name, is still served."""
    with web.listener(TARGETS[0]) as listener:
        assert exchange(web, listener, source="127.0.0.2") == f"reply from {TARGETS[0]}".encode()


def test_the_sandbox_is_really_applied(systemd_boot: BootedSystemd) -> None:
    """Honesty check: units generated for an IPv4 target alone, run with an IPv6 target
    added behind the generator's back, cannot reach it (RestrictAddressFamilies=)."""
    files = generate("web --listen-stream 8080 -- 127.0.0.1:9001")
    exec_start = "/usr/local/bin/forkproxy 127.0.0.1:9001 [::1]:9002"
    files["web.service.d/more-targets.conf"] = f"[Service]\nExecStart=\nExecStart={exec_start}\n"
    systemd_boot.install(files)
    systemd_boot.systemctl("start", "web.socket")
    with (
        systemd_boot.listener("[::1]:9002") as listener,
        systemd_boot.socket(socket.AF_INET) as client,
    ):
        client.settimeout(CLIENT_TIMEOUT)
        client.connect(("127.0.0.1", 8080))
        assert read_all(client) == b""  # closed: no target could be reached
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    # The warning reaches the journal after the client's EOF (the compiled engine logs
    # once its batch is done, and journald reads the stream on its own time).
    wait_until(
        lambda: "Address family not supported by protocol" in systemd_boot.journal("web.service"),
        30,
        "the warning in the journal",
    )


def test_accept_units_relay_each_connection(systemd_boot: BootedSystemd) -> None:
    files = generate("one --listen-stream 8081 --accept -- /run/app.sock 127.0.0.1:9001")
    systemd_boot.install(files)
    systemd_boot.systemctl("start", "one.socket")
    for target in ("/run/app.sock", "127.0.0.1:9001"):
        with systemd_boot.listener(target) as listener:
            assert exchange(systemd_boot, listener, port=8081) == f"reply from {target}".encode()


def test_host_name_target_resolves_under_the_sandbox(systemd_boot: BootedSystemd) -> None:
    """A host name is resolved inside the sandbox when connecting ('localhost', from
    /etc/hosts, and with it whatever the resolver needs)."""
    systemd_boot.install(generate("name --listen-stream 8082 -- localhost:9003"))
    systemd_boot.systemctl("start", "name.socket")
    with systemd_boot.listener("127.0.0.1:9003") as listener:
        assert exchange(systemd_boot, listener, port=8082) == b"reply from 127.0.0.1:9003"


def test_systemctl_reload_keeps_the_service_and_its_main_pid(web: BootedSystemd) -> None:
    """`systemctl reload` of a generated unit: forkproxy re-executes in place, the unit
    stays active with the same MainPID and without a restart, and relays throughout."""
    assert "ExecReload=kill -HUP $MAINPID" in generate(ACCEPTANCE)["web.service"]
    with web.listener(TARGETS[0]) as listener:
        assert exchange(web, listener) == f"reply from {TARGETS[0]}".encode()  # starts it
        main_pid = _show(web, "MainPID")
        for done in range(1, 4):
            # Until systemd has read READY=1 (of the start, or of the last reload's new
            # workers), a reload job merges into the job running and does nothing.
            wait_until(lambda: _show(web, "SubState") == "running", CLIENT_TIMEOUT, "running")
            web.systemctl("reload", "web.service")
            wait_until(
                lambda done=done: web.journal("web.service").count("reload done") == done,
                CLIENT_TIMEOUT,
                f"reload {done} to be done",
            )
            wait_until(lambda: _show(web, "SubState") == "running", CLIENT_TIMEOUT, "running")
            assert _show(web, "ActiveState") == "active"
            assert _show(web, "MainPID") == main_pid and _show(web, "NRestarts") == "0"
            assert exchange(web, listener) == f"reply from {TARGETS[0]}".encode()
    assert "reload failed" not in web.journal("web.service")


def _show(booted: BootedSystemd, prop: str) -> str:
    return booted.systemctl("show", "web.service", "-p", prop, "--value").stdout.strip()
