"""A reload keeps the targets' state: the re-executed master takes over the target table
in the shared memory, so a target its checks found down stays down (no client is sent
to it after the reload), one up stays up, and the per-target totals go on."""

import socket
from pathlib import Path

from tests.support.proxy import Proxy, free_port, run_proxy, wait_until
from tests.support.reloading import NamedTarget, Samples, greeting, reload, scrape, value
from tests.support.supervision import METRICS_LISTENERS, METRICS_NAMES

# A check a second and three failures to go down: a master that forgot the state would
# take the down target for up for seconds after the reload, long enough for the clients
# below to be sent to it.
CHECKS = ["--check-interval", "1s", "--check-fall", "3", "--check-rise", "2", "-w", "2"]
CLIENTS = 20  # before the reload, and again after it
DEADLINE = 30.0


class Watch:
    """Scrapes of one proxy, each one's forkproxy_target_up of both targets kept."""

    def __init__(self, proxy: Proxy, up: str, down: str) -> None:
        self.proxy, self.up, self.down = proxy, up, down
        self.seen: list[tuple[float, float]] = []  # (up's, down's)
        self.last: Samples = {}

    def scrape(self) -> Samples | None:
        """One scrape (None if it met the reload's exec)."""
        samples = scrape(self.proxy)
        if samples is not None:
            self.last = samples
            self.seen.append((self.series("forkproxy_target_up", self.up), self.target_up()))
        return samples

    def target_up(self) -> float:
        return self.series("forkproxy_target_up", self.down)

    def series(self, name: str, target: str, **labels: str) -> float:
        return value(self.last, name, listener="proxy", target=target, **labels)

    def fresh(self) -> Samples:
        wait_until(lambda: self.scrape() is not None, DEADLINE, "a scrape")
        return self.last

    def totals(self) -> dict[str, float]:
        """The per-target counters, from a fresh scrape."""
        self.fresh()
        return {
            "connections up": self.series("forkproxy_target_connections_total", self.up),
            "connections down": self.series("forkproxy_target_connections_total", self.down),
            "refused down": self.series(
                "forkproxy_target_connect_errors_total", self.down, reason="refused"
            ),
        }

    def checks(self) -> float:
        return value(self.fresh(), "forkproxy_target_check_duration_seconds_count")


def _served_by(proxy: Proxy) -> str:
    with proxy.connect(timeout=10) as client:
        client.shutdown(socket.SHUT_WR)
        return greeting(client)


def test_a_reload_keeps_a_down_target_down_and_the_totals(workdir: Path) -> None:
    down = f"127.0.0.1:{free_port()}"  # nothing listens there: its checks are refused
    with NamedTarget("up") as up:
        args = [*CHECKS, up.target, down]
        with run_proxy(args, workdir, listeners=METRICS_LISTENERS, names=METRICS_NAMES) as proxy:
            watch = Watch(proxy, up.target, down)
            wait_until(
                lambda: watch.scrape() is not None and watch.seen[-1] == (1, 0),
                DEADLINE,
                "the checks to find the down target down",
            )
            assert [_served_by(proxy) for _ in range(CLIENTS)] == ["up"] * CLIENTS
            before = watch.totals()
            assert before["connections up"] == CLIENTS
            watch.seen.clear()

            reload(watch.scrape, proxy.signal)
            # At once, before a check could have taken the target down again.
            assert [_served_by(proxy) for _ in range(CLIENTS)] == ["up"] * CLIENTS
            after = watch.totals()
            assert after["connections down"] == before["connections down"] == 0
            assert after["refused down"] == before["refused down"]  # no client sent there
            assert after["connections up"] == before["connections up"] + CLIENTS

            # Once the old workers are gone, their counts are folded into the retired
            # totals: no step back.
            wait_until(
                lambda: value(watch.fresh(), "forkproxy_workers", generation="draining") == 0,
                DEADLINE,
                "the old workers to finish draining",
            )
            assert watch.totals() == after
            # More than --check-fall checks of each target since: the down one never came
            # up (that takes --check-rise passes), nor was it taken down again.
            checks = watch.checks()
            wait_until(lambda: watch.checks() >= checks + 8, DEADLINE, "four rounds of checks")
            assert watch.seen and set(watch.seen) == {(1, 0)}  # every scrape since the signal
            gone_down = f"target '{down}' of listener 'proxy' is down"
            log = proxy.stderr()
            assert gone_down in log  # before the reload
            after_exec = log[log.rfind("reload: re-executing") :]
            assert gone_down not in after_exec, "the reload lost the target's state"
            assert watch.totals() == after
