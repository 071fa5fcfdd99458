"""--config and --check with the real forkproxy: per-listener routes and settings from one
file, real targets; the exit statuses and lines of --check; the shipped example."""

import ipaddress
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.counting import CountingBackend, outcome
from tests.support.proxy import FORKPROXY, REPO, run_backend, run_cli, run_proxy
from tests.support.proxy_protocol_decoder import ProxyHeader, read_header

EXAMPLE = REPO / "examples" / "forkproxy.toml"
pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="--config needs tomllib")


class HeaderTarget:
    """Reads a PROXY header from every connection, keeps it, answers b"ok " + the line
    that followed it, and closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.headers: list[ProxyHeader] = []
        self.errors: list[BaseException] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    header, rest = read_header(conn, timeout=10)
                    while not rest.endswith(b"\n"):
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        rest += chunk
                    self.headers.append(header)
                    conn.sendall(b"ok " + rest)
                except BaseException as error:  # reported by the test
                    self.errors.append(error)


@pytest.fixture
def header_targets() -> Iterator[tuple[HeaderTarget, HeaderTarget]]:
    targets = (HeaderTarget(), HeaderTarget())
    yield targets
    for target in targets:
        target.sock.close()


def _exchange(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line)
    sock.shutdown(socket.SHUT_WR)
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_two_named_listeners_route_with_their_own_settings(
    workdir: Path, header_targets: tuple[HeaderTarget, HeaderTarget]
) -> None:
    """One file: 'web' to its target with a v2 header, 'api' to an echo target with none,
    and an unnamed listener to the global target with the global v1 header."""
    web, default = header_targets
    config = workdir / "forkproxy.toml"
    with run_backend("echo") as api:
        config.write_text(
            f"""
            targets = ["{default.target}"]
            proxy-protocol = "v1"
            workers = 2

            [listeners.web]
            targets = ["{web.target}"]
            proxy-protocol = "v2"

            [listeners.api]
            targets = ["{api.target}"]
            proxy-protocol = false
            """
        )
        with run_proxy(
            ["--config", str(config)], workdir, ("tcp", "tcp", "tcp"), names=("web", "api")
        ) as proxy:
            with proxy.connect(0) as client:
                assert _exchange(client, b"to web\n") == b"ok to web\n"
                web_port = client.getsockname()[1]
            with proxy.connect(1) as client:
                assert _exchange(client, b"to api\n") == b"to api\n"  # no header before it
            with proxy.connect(2) as client:
                assert _exchange(client, b"to the rest\n") == b"ok to the rest\n"
                default_port = client.getsockname()[1]
    assert web.errors == default.errors == []
    (web_header,) = web.headers
    assert (web_header.version, web_header.command) == (2, "PROXY")
    assert web_header.source_address == ipaddress.ip_address("127.0.0.1")
    assert web_header.source_port == web_port
    (default_header,) = default.headers
    assert (default_header.version, default_header.source_port) == (1, default_port)


def _client_from(source: str, address: object) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


def test_per_listener_source_limits_count_one_client_across_listeners(workdir: Path) -> None:
    config = workdir / "forkproxy.toml"
    held = []
    with CountingBackend() as target:
        config.write_text(
            f'targets = ["{target.target}"]\nworkers = 2\n'
            "[listeners.web]\nconnections-max-per-source = 1\n"
            "[listeners.api]\nconnections-max-per-source = 3\n"
        )
        with run_proxy(
            ["--config", str(config)], workdir, ("tcp", "tcp"), names=("web", "api")
        ) as proxy:
            web, api = proxy.address(0), proxy.address(1)
            try:
                for address, expected in (
                    (web, "admitted"),  # 127.0.0.2 holds 1
                    (web, "refused"),  # web allows 1
                    (api, "admitted"),  # 2: the count is the client's, across listeners
                    (api, "admitted"),  # 3
                    (api, "refused"),  # api allows 3
                    (web, "refused"),
                ):
                    client = _client_from("127.0.0.2", address)
                    held.append(client)
                    assert outcome(client) == expected, (address, len(held))
                other = _client_from("127.0.0.3", web)  # another source: its own count
                held.append(other)
                assert outcome(other) == "admitted"
            finally:
                for client in held:
                    client.close()


def test_the_command_line_overrides_the_file(workdir: Path) -> None:
    config = workdir / "forkproxy.toml"
    with CountingBackend() as live, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
        config.write_text(f'targets = ["{dead}"]\nconnections-max = 1\nworkers = 1\n')
        argv = ["--config", str(config), "-c", "2", live.target]
        with run_proxy(argv, workdir) as proxy, proxy.connect() as first, proxy.connect() as second:
            assert (outcome(first), outcome(second)) == ("admitted", "admitted")
        assert live.total == 2


# -- errors at start, and --check --------------------------------------------------------


BAD = """\
targets = ["127.0.0.1:80"]
workers = 0

[listeners.web]
connect-timeout = "5 minutess"
nodelay = "no"
"""


def test_a_bad_file_stops_the_start_with_one_line(workdir: Path) -> None:
    config = workdir / "bad.toml"
    config.write_text(BAD)
    result = run_cli(["--config", str(config)])
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"forkproxy: {config}:2: key 'workers': must be in 1-128, got 0 "
        "(and 2 more: forkproxy --check lists them all)\n"
    )


def test_check_lists_every_error_and_exits_2(workdir: Path) -> None:
    config = workdir / "bad.toml"
    config.write_text(BAD)
    result = run_cli(["--check", "--config", str(config)])
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"forkproxy: {config}:2: key 'workers': must be in 1-128, got 0",
        f"forkproxy: {config}:5: key 'connect-timeout' in [listeners.web]: invalid time span "
        "'5 minutess': unknown unit 'minutess'",
        f"forkproxy: {config}:6: key 'nodelay' in [listeners.web]: expected true or false, "
        "got a string",
    ]
    result = run_cli(["--check", "--connect-timeout=soon", "127.0.0.1:80"])
    assert result.returncode == 2
    assert result.stderr == (
        "forkproxy: invalid --connect-timeout= value 'soon': expected a number at 'soon'\n"
    )
    assert run_cli(["--check", "--no-such-option"]).returncode == 2


def test_check_prints_the_routes_of_listen_addresses_without_binding_them(workdir: Path) -> None:
    config = workdir / "forkproxy.toml"
    with socket.create_server(("127.0.0.1", 0)) as taken:  # bound: --check must not bind
        port = taken.getsockname()[1]
        config.write_text(
            f'targets = ["localhost:80"]\nlisten = ["127.0.0.1:{port}"]\n'
            f'[listeners.web]\nlisten = "{workdir}/web.sock"\ntargets = ["/run/web.sock"]\n'
            'proxy-protocol = "v2"\n'
        )
        result = run_cli(["--check", "--config", str(config), "--idle-timeout=1min"])
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        f"127.0.0.1:{port} -> localhost:80  (idle-timeout=1min)",
        f"'web' {workdir}/web.sock -> /run/web.sock  (proxy-protocol=v2, idle-timeout=1min)",
    ]
    assert not (workdir / "web.sock").exists()


def _check_with_sockets(config: Path, names: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """forkproxy --check with listening sockets passed as systemd passes them."""
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in names]
    try:
        specs = [
            f"{sock.fileno()}:{name}" if name else str(sock.fileno())
            for sock, name in zip(sockets, names, strict=True)
        ]
        return subprocess.run(
            [sys.executable, "-m", "tests.support.activate", *specs, "--"]
            + [FORKPROXY, "--check", "--config", str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            pass_fds=[s.fileno() for s in sockets],
        )
    finally:
        for sock in sockets:
            sock.close()


def test_check_with_passed_sockets_names_them(workdir: Path) -> None:
    config = workdir / "forkproxy.toml"
    config.write_text('targets = ["127.0.0.1:80"]\n[listeners.web]\ntargets = ["/run/w.sock"]\n')
    result = _check_with_sockets(config, ("web", ""))
    assert (result.returncode, result.stderr) == (0, "")
    web, other = result.stdout.splitlines()
    assert web.startswith("fd 3 'web' 127.0.0.1:") and web.endswith(" -> /run/w.sock")
    assert other.startswith("fd 4 127.0.0.1:") and other.endswith(" -> 127.0.0.1:80")

    config.write_text(config.read_text() + '[listeners.api]\nproxy-protocol = "v1"\n')
    result = _check_with_sockets(config, ("web", ""))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"forkproxy: {config}:4: section [listeners.api]: no listening socket is named 'api' "
        "(named: 'web'; name them with FileDescriptorName= or --listen NAME=ADDR)\n"
    )


def test_the_shipped_example_passes_check() -> None:
    result = run_cli(["--check", "--config", str(EXAMPLE)])
    assert (result.returncode, result.stderr) == (0, "")
    assert [line.partition("  (")[0] for line in result.stdout.splitlines()] == [
        "'web' 0.0.0.0:8000 -> 127.0.0.1:8080, /run/web/app.sock",
        "'api' [::1]:8443 -> localhost:9443",
    ]


def test_the_man_page_shows_the_shipped_example() -> None:
    page = (REPO / "man" / "forkproxy.8.scd").read_text()
    assert f"```\n{EXAMPLE.read_text()}```" in page
