"""A real Prometheus server for tests, on loopback, in a temporary directory.

`run_prometheus` writes a configuration (scraping each address given every second,
evaluating the rule files given every second), starts the `prometheus` binary on
127.0.0.1 with a port the kernel picks (read back from /proc, so no free-port race),
waits for /-/ready, and on exit stops it by pid and removes its directory.
"""

import contextlib
import json
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.proxy import wait_until

LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it
TCP_LISTEN = "0A"


class QueryError(Exception):
    """Prometheus refused a query (it does not parse, or cannot be evaluated)."""


class PrometheusAPI:
    """Prometheus' HTTP API (/api/v1) at `base`, http://127.0.0.1:PORT."""

    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params: str) -> Any:
        url = self.base + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            with error:
                body = json.load(error)
            raise QueryError(f"{body.get('errorType')}: {body.get('error')}") from None

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one sample) `expr` evaluates to now."""
        data = self.get("/api/v1/query", query=expr)["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def rules(self) -> dict[str, dict[str, Any]]:
        """Every loaded rule (recording and alerting) by its name."""
        groups = self.get("/api/v1/rules")["data"]["groups"]
        return {rule["name"]: rule for group in groups for rule in group["rules"]}

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/-/ready", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(address as /proc/net writes it, port) of every TCP socket `pid` listens on."""
    inodes = socket_inodes(pid)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in rows.read().splitlines()[1:]:
                fields = row.split()
                if fields[3] == TCP_LISTEN and int(fields[9]) in inodes:
                    address, port = fields[1].rsplit(":", 1)
                    found.append((address, int(port, 16)))
    return found


@contextlib.contextmanager
def run_prometheus(
    binary: str, scrape: Sequence[str], rule_files: Sequence[Path], job: str = "forkproxy"
) -> Iterator[PrometheusAPI]:
    """Prometheus scraping `scrape` (HOST:PORT each) as job `job` every second, with
    `rule_files` evaluated every second; its API once it is ready."""
    with tempfile.TemporaryDirectory(prefix="fp-prometheus-") as directory:
        root = Path(directory)
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(scrape)}]}],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        log_path = root / "prometheus.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={root / 'prometheus.yml'}",
                    f"--storage.tsdb.path={root / 'data'}",
                    "--web.listen-address=127.0.0.1:0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            found: list[tuple[str, int]] = []

            def listening() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"prometheus exited: {log_path.read_text()[-3000:]}")
                found[:] = listening_addresses(process.pid)
                return bool(found)

            wait_until(listening, 30, "prometheus to listen")
            assert [address for address, _ in found] == [LOOPBACK], found
            api = PrometheusAPI(f"http://127.0.0.1:{found[0][1]}")
            wait_until(api.ready, 30, "prometheus /-/ready")
            yield api
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
