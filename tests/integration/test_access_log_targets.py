"""The access log beside balancing, with the installed forkproxy: each line names the
target the balancer chose, so the lines per target equal the per-target totals; --balance
source follows the address a PROXY header carried; a bad PROXY header is a refusal of
its listener."""

import contextlib
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from forkproxy.relay.balance import source_score, target_salt
from forkproxy.relay.proxy_protocol import encode_v1
from forkproxy.settings.address import parse_target
from forkproxy.shared.per_source import source_key
from tests.integration.test_health_checks import samples
from tests.support.access_log import wait_for_lines
from tests.support.proxy import Backend, run_backend, run_proxy, send_all_then_read, wait_until

# Passed by the harness: the proxied socket, named web, then the metrics socket.
LISTENERS = (("tcp", "tcp"), ("web", "metrics"))
SERVER = ("203.0.113.9", 443)


@contextlib.contextmanager
def two_backends() -> Iterator[list[Backend]]:
    with run_backend("echo") as first, run_backend("echo") as second:
        yield [first, second]


def _per_target(name: str, target: str, scrape: dict) -> float:  # type: ignore[type-arg]
    return scrape.get((name, (("listener", "web"), ("target", target))), 0.0)


def test_each_line_names_the_chosen_target_and_lines_match_the_per_target_totals(
    workdir: Path,
) -> None:
    log = workdir / "access.log"
    with two_backends() as backends:
        targets = [backend.target for backend in backends]
        args = ["-w", "2", f"--access-log={log}", "--access-log-format=json", *targets]
        with run_proxy(args, workdir, *LISTENERS) as proxy:
            for n in range(20):
                with proxy.connect() as client:
                    assert send_all_then_read(client, b"x" * (n + 1)) == b"x" * (n + 1)
            lines = wait_for_lines(log, 20)
            scrape = samples(proxy)
    assert all(line["end"] == "client-closed" for line in lines), lines
    by_target = Counter(str(line["target"]) for line in lines)
    assert set(by_target) == set(targets), by_target  # round-robin used both
    for target in targets:
        count = _per_target("forkproxy_target_connections_total", target, scrape)
        assert count == by_target[target], (target, by_target, count)
        mine = [line for line in lines if line["target"] == target]
        sent = sum(int(str(line["bytes_from_client"])) for line in mine)
        relayed = scrape.get(
            (
                "forkproxy_target_relayed_bytes_total",
                (("direction", "to_target"), ("listener", "web"), ("target", target)),
            )
        )
        assert relayed == sent, (target, relayed, sent)


def _expected_target(client: tuple[str, int], targets: list[str]) -> str:
    """The target --balance source picks for `client` while every target is up."""
    key = source_key(socket.AF_INET, client)
    assert key is not None
    return max(targets, key=lambda text: source_score(key, target_salt(parse_target(text))))


def test_source_balancing_hashes_the_carried_client_address(workdir: Path) -> None:
    log = workdir / "access.log"
    with two_backends() as backends:
        targets = [backend.target for backend in backends]
        # Carried clients the hash sends to different targets: the connection's own
        # address (always 127.0.0.1) would send them all to one.
        picks: dict[str, tuple[str, int]] = {}
        for n in range(1, 255):
            client = (f"198.51.100.{n}", 40000 + n)
            picks.setdefault(_expected_target(client, targets), client)
            if len(picks) == 2:
                break
        assert len(picks) == 2
        args = ["-w", "2", "--accept-proxy", "--balance=source", f"--access-log={log}"]
        with run_proxy([*args, *targets], workdir, *LISTENERS) as proxy:
            for _ in range(5):
                for client in picks.values():
                    with proxy.connect() as sock:
                        header = encode_v1(client, SERVER, socket.AF_INET)
                        assert send_all_then_read(sock, header + b"ping") == b"ping"
            lines = wait_for_lines(log, 10)
    for line in lines:
        host, _, port = str(line["client"]).rpartition(":")
        assert line["target"] == _expected_target((host, int(port)), targets), line


def test_a_bad_proxy_header_counts_as_a_refusal_of_its_listener(workdir: Path) -> None:
    with (
        run_backend("echo") as backend,
        run_proxy(["--accept-proxy", backend.target], workdir, *LISTENERS) as proxy,
    ):
        # The proxy may close (RST) as soon as the first bytes are not a header: the
        # client's send, shutdown or read can each find the connection gone.
        with proxy.connect() as client, contextlib.suppress(OSError):
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            client.shutdown(socket.SHUT_WR)
            assert client.recv(10) == b""

        def refused() -> float:
            labels = (("listener", "web"), ("reason", "proxy_header"))
            return samples(proxy).get(("forkproxy_listener_connections_refused_total", labels), 0.0)

        wait_until(lambda: refused() == 1, 10, "the refusal counted")
