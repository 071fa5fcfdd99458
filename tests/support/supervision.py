"""Watching a running proxy from tests: a request load that counts failures, and its
metrics endpoint (a passed socket named "metrics" as the second listener)."""

import http.client
import threading

from prometheus_client.parser import text_string_to_metric_families

from tests.support.proxy import Proxy, send_all_then_read, wait_until

# Passed by the harness: the proxied socket, then the metrics socket.
METRICS_LISTENERS = ("tcp", "tcp")
METRICS_NAMES = ("proxy", "metrics")


class RequestLoad:
    """`clients` threads, each looping connect / request / full reply / close."""

    def __init__(self, proxy: Proxy, clients: int = 20) -> None:
        self.proxy = proxy
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, index: int) -> None:
        payload = b"request %d " % index * 50
        while not self.stop.is_set():
            try:
                with self.proxy.connect(timeout=10) as client:
                    reply = send_all_then_read(client, payload)
                if reply != payload:
                    raise AssertionError(f"got {len(reply)} bytes back, sent {len(payload)}")
                with self.lock:
                    self.ok += 1
            except (OSError, AssertionError) as error:
                with self.lock:
                    self.failures.append(repr(error))

    def __enter__(self) -> "RequestLoad":
        for thread in self.threads:
            thread.start()
        wait_until(lambda: self.ok >= 100, 20, "the load to get going")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def more(self, count: int = 200) -> None:
        """Let at least `count` more requests complete."""
        target = self.ok + count
        wait_until(lambda: self.ok >= target, 30, f"{count} more requests")


def get(proxy: Proxy, path: str, timeout: float = 10.0) -> tuple[int, str]:
    """Status and body of a GET to the proxy's metrics socket (its second listener)."""
    host, port = proxy.address(1)[:2]  # type: ignore[index]
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def gauges(proxy: Proxy) -> dict[str, float]:
    """Unlabelled samples of one scrape, by name (forkproxy_workers_target, ...),
    forkproxy_workers: the live workers of every generation, and "reloads": the reloads
    counted, ok or failed."""
    status, body = get(proxy, "/metrics")
    assert status == 200
    samples = [
        sample for family in text_string_to_metric_families(body) for sample in family.samples
    ]
    numbers = {sample.name: sample.value for sample in samples if not sample.labels}
    numbers["forkproxy_workers"] = sum(
        sample.value for sample in samples if sample.name == "forkproxy_workers"
    )
    numbers["reloads"] = sum(
        sample.value for sample in samples if sample.name == "forkproxy_reloads_total"
    )
    return numbers


def reloads_settled(proxy: Proxy, counted: float) -> bool:
    """From the master's log: every reload started (on a signal, or after the one it
    waited for) is `counted` (ok or failed), and none waits to start."""
    lines = proxy.stderr().splitlines()
    waited = sum(
        line.endswith("reloading once the running start or reload is done") for line in lines
    )
    resumed = sum(line.endswith("starting the reload asked for meanwhile") for line in lines)
    started = resumed + sum(
        line.endswith(("SIGHUP: reloading", "SIGUSR2: reloading")) for line in lines
    )
    return waited == resumed and started == counted


def converged(proxy: Proxy) -> bool:
    """As many live workers as the target, all serving (/healthz 200), none draining, and
    no reload running or waiting to run (one asked for during another runs after it)."""
    try:
        numbers = gauges(proxy)
        target = numbers["forkproxy_workers_target"]
        return (
            numbers["forkproxy_workers"] == target == len(proxy.workers())
            and get(proxy, "/healthz")[0] == 200
            and reloads_settled(proxy, numbers["reloads"])
        )
    except TimeoutError:  # a master starved of CPU by many workers starting at once
        return False
