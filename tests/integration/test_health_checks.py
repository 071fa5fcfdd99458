"""Active health checks against real nginx targets, seen through the real program's
metrics, /healthz, log and STATUS=: a stopped target goes down after --check-fall failed
checks and comes back when it restarts; an HTTP check fails on a 503 although TCP
connects; checks carry the PROXY header nginx expects; /healthz fails while a listener
has no target up."""

import http.client
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.nginx import Nginx, NginxFactory
from tests.support.proxy import Proxy, run_cli, run_proxy, wait_until

# Passed by the harness: the proxied socket, named web, then the metrics socket.
LISTENERS = ("tcp", "tcp")
NAMES = ("web", "metrics")
CHECKS = ["--check-interval", "200ms", "--check-fall", "2", "-w", "2"]
DEADLINE = 30.0  # seconds: generous, the checks take well under a second


def fetch(proxy: Proxy, path: str) -> tuple[int, str]:
    host, port = proxy.address(1)[:2]  # type: ignore[index]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def samples(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = fetch(proxy, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def target_up(proxy: Proxy, nginx: Nginx) -> float:
    labels = (("listener", "web"), ("target", _target(nginx)))
    return samples(proxy)[("forkproxy_target_up", labels)]


def checks_done(proxy: Proxy) -> float:
    return samples(proxy)[("forkproxy_target_check_duration_seconds_count", ())]


def _target(nginx: Nginx) -> str:
    return f"127.0.0.1:{nginx.port}"


def _lines(proxy: Proxy, pattern: str) -> list[str]:
    return [line for line in proxy.stderr().splitlines() if re.search(pattern, line)]


def test_a_stopped_target_goes_down_and_comes_back_when_restarted(
    nginx_factory: NginxFactory, workdir: Path
) -> None:
    first, second, third = (nginx_factory() for _ in range(3))
    targets = [_target(one) for one in (first, second, third)]
    with run_proxy([*CHECKS, *targets], workdir, LISTENERS, NAMES) as proxy:
        wait_until(lambda: checks_done(proxy) >= 6, DEADLINE, "two rounds of checks")
        assert [target_up(proxy, one) for one in (first, second, third)] == [1, 1, 1]
        port = second.port
        second.stop()
        wait_until(lambda: target_up(proxy, second) == 0, DEADLINE, "the stopped target down")
        assert (target_up(proxy, first), target_up(proxy, third)) == (1, 1)
        down = f"target '{targets[1]}' of listener 'web' is down: connection refused "
        (line,) = _lines(proxy, re.escape(down))  # once, however many checks fail after
        assert line.endswith("(2 checks failed in a row)")
        proxy.notifications.wait_for(
            "STATUS=2 workers, 0 active, 0 refused, targets 2/3 up", DEADLINE
        )
        restarted = nginx_factory(f"127.0.0.1:{port}")
        wait_until(lambda: target_up(proxy, restarted) == 1, DEADLINE, "the target back up")
        up = f"target '{targets[1]}' of listener 'web' is up (2 checks passed in a row)"
        assert len(_lines(proxy, re.escape(up))) == 1
        proxy.notifications.wait_for(
            "STATUS=2 workers, 0 active, 0 refused, targets 3/3 up", DEADLINE
        )
        assert _lines(proxy, r"WARNING .*target .* is down") == [line]


def test_an_http_503_is_down_although_tcp_connects(
    nginx_factory: NginxFactory, workdir: Path
) -> None:
    sick = nginx_factory(statuses={"/health": 503})
    well = nginx_factory()
    args = [*CHECKS, "--check-http", "/health", _target(sick), _target(well)]
    with run_proxy(args, workdir, LISTENERS, NAMES) as proxy:
        wait_until(lambda: target_up(proxy, sick) == 0, DEADLINE, "the 503 target down")
        assert sick.get("/").status == 200  # it takes connections, and requests
        wait_until(lambda: checks_done(proxy) >= 6, DEADLINE, "more checks")
        assert target_up(proxy, well) == 1
        (line,) = _lines(proxy, "is down")
        assert line.endswith(
            f"target '{_target(sick)}' of listener 'web' is down: HTTP 503 "
            "(2 checks failed in a row)"
        )
    checks = [entry for entry in well.access_log_entries() if entry.request]
    assert checks and {entry.request for entry in checks} == {"GET /health HTTP/1.1"}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_checks_carry_a_proxy_header_nginx_accepts(
    nginx_factory: NginxFactory, workdir: Path, version: str
) -> None:
    nginx = nginx_factory(proxy_protocol=True)
    args = [*CHECKS, f"--proxy-protocol={version}", "--check-http", "/", _target(nginx)]
    with run_proxy(args, workdir, LISTENERS, NAMES) as proxy:
        entries = nginx.wait_for_access_log(3, timeout=DEADLINE)
        assert target_up(proxy, nginx) == 1
    assert {(entry.request, entry.status) for entry in entries} == {("GET / HTTP/1.1", 200)}
    # UNKNOWN (v1) and LOCAL (v2): the proxy's own connection, no client address.
    assert {entry.proxy_protocol_addr for entry in entries} == {None}
    assert "broken header" not in nginx.error_log_text()


def test_healthz_fails_while_every_target_of_a_listener_is_down(
    nginx_factory: NginxFactory, workdir: Path
) -> None:
    first, second = nginx_factory(), nginx_factory()
    ports = [first.port, second.port]
    with run_proxy([*CHECKS, _target(first), _target(second)], workdir, LISTENERS, NAMES) as proxy:
        wait_until(lambda: fetch(proxy, "/healthz")[0] == 200, DEADLINE, "/healthz 200")
        first.stop()
        second.stop()
        wait_until(lambda: fetch(proxy, "/healthz")[0] == 503, DEADLINE, "/healthz 503")
        assert fetch(proxy, "/healthz") == (503, "listener 'web' has no target up (2 down)\n")
        status, verbose = fetch(proxy, "/healthz?verbose")
        assert status == 503
        assert verbose.splitlines()[1:] == [
            "listener 'web': 0 of 2 targets up",
            f"  127.0.0.1:{ports[0]} DOWN (checks fail: connection refused, for "
            + verbose.splitlines()[2].split(", for ", 1)[1],
            f"  127.0.0.1:{ports[1]} DOWN (checks fail: connection refused, for "
            + verbose.splitlines()[3].split(", for ", 1)[1],
        ]
        assert fetch(proxy, "/status") == (status, verbose)
        nginx_factory(f"127.0.0.1:{ports[1]}")
        wait_until(lambda: fetch(proxy, "/healthz")[0] == 200, DEADLINE, "/healthz 200 again")
        assert fetch(proxy, "/healthz") == (200, "2 of 2 workers serving\n")


def test_a_host_name_target_is_resolved_off_the_loop_and_checked(
    nginx_factory: NginxFactory, workdir: Path
) -> None:
    nginx = nginx_factory()
    target = f"localhost:{nginx.port}"
    with run_proxy([*CHECKS, target], workdir, LISTENERS, NAMES) as proxy:
        labels = (("listener", "web"), ("target", target))
        wait_until(lambda: checks_done(proxy) >= 3, DEADLINE, "checks")
        assert samples(proxy)[("forkproxy_target_up", labels)] == 1
        nginx.stop()
        wait_until(
            lambda: samples(proxy)[("forkproxy_target_up", labels)] == 0,
            DEADLINE,
            "the host-name target down",
        )
        # The resolver processes were reaped: the master's children are its workers.
        wait_until(lambda: not _zombies(proxy.pid), DEADLINE, "no zombie children")


def _zombies(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] == "Z":
            found.append(int(entry))
    return found


def test_promtool_takes_a_scrape_with_checks(nginx_factory: NginxFactory, workdir: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (apt-get install prometheus) and $CI is set")
        pytest.skip("promtool is missing (Debian package prometheus)")
    nginx = nginx_factory()
    args = [*CHECKS, "--check-http", "/", _target(nginx), "127.0.0.1:1"]
    with run_proxy(args, workdir, LISTENERS, NAMES) as proxy:
        wait_until(lambda: checks_done(proxy) >= 4, DEADLINE, "checks")
        host, port = proxy.address(1)[:2]  # type: ignore[index]
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.request("GET", "/metrics")
        body = connection.getresponse().read()
        connection.close()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, b"")


def test_more_pairs_than_the_table_holds_is_a_startup_error(workdir: Path) -> None:
    targets = [f"127.0.0.{1 + n // 200}:{1000 + n}" for n in range(257)]
    checked = run_cli(["--check", "--listen", "web=127.0.0.1:1", *targets])
    assert checked.returncode == 2
    assert "too many targets: the listeners have 257 (listener, target) pairs" in checked.stderr
    with run_proxy(targets, workdir, wait_ready=False) as proxy:
        assert proxy.wait(30) == 1  # as any start-up error (--check: 2)
        assert proxy.stderr().strip().splitlines() == [
            "forkproxy: too many targets: the listeners have 257 (listener, target) pairs, "
            "and forkproxy keeps health and metrics for at most 256"
        ]
