"""Reloads and the access log: the new workers write to the file the new settings name,
SIGUSR1 still reopens it after the exec, and a path the new settings cannot open fails
the reload while the old workers go on writing to theirs."""

import signal
from pathlib import Path

from tests.support.access_log import read_log, wait_for_lines
from tests.support.proxy import Proxy, run_proxy, wait_until
from tests.support.reloading import NamedTarget, greeting, reload, scrape
from tests.support.supervision import METRICS_LISTENERS, METRICS_NAMES


def _settings(path: Path, target: str, access_log: Path) -> None:
    path.write_text(f'targets = ["{target}"]\nworkers = 2\naccess-log = "{access_log}"\n')


def _one(proxy: Proxy, name: str) -> None:
    """One connection through the proxy to the target called `name`, closed by us."""
    with proxy.connect(timeout=10) as client:
        assert greeting(client) == name


def test_a_reload_switches_the_file_and_sigusr1_still_reopens_it(workdir: Path) -> None:
    config = workdir / "forkproxy.toml"
    first, second, rotated = workdir / "first.log", workdir / "second.log", workdir / "old.log"
    with NamedTarget("old") as old, NamedTarget("new") as new:
        _settings(config, old.target, first)
        with run_proxy(
            ["--config", str(config)], workdir, listeners=METRICS_LISTENERS, names=METRICS_NAMES
        ) as proxy:
            _one(proxy, "old")
            wait_for_lines(first, 1)
            _settings(config, new.target, second)
            reload(lambda: scrape(proxy), proxy.signal)
            for _ in range(5):
                _one(proxy, "new")
            lines = wait_for_lines(second, 5)
            assert {line["target"] for line in lines} == {new.target}
            assert len(read_log(first)) == 1  # nothing of the new workers there
            second.rename(rotated)
            proxy.signal(signal.SIGUSR1)
            # Until a worker that reopened has served one (each does so at its own pace).
            sent = 0
            while not read_log(second) and sent < 1000:
                _one(proxy, "new")
                sent += 1
            assert read_log(second), "no worker reopened the log after the reload"
            wait_until(
                lambda: len(read_log(second)) + len(read_log(rotated)) == 5 + sent,
                15,
                "every connection's line",
            )
            assert "SIGUSR1: reopening the access log files" in proxy.stderr()


def test_a_path_the_new_settings_cannot_open_fails_the_reload(workdir: Path) -> None:
    config = workdir / "forkproxy.toml"
    log, missing = workdir / "access.log", workdir / "missing" / "access.log"
    with NamedTarget("old") as old:
        _settings(config, old.target, log)
        with run_proxy(
            ["--config", str(config)], workdir, listeners=METRICS_LISTENERS, names=METRICS_NAMES
        ) as proxy:
            workers = proxy.workers()
            _settings(config, old.target, missing)
            reload(lambda: scrape(proxy), proxy.signal, expect="failed")
            assert f"reload failed: cannot open access log '{missing}'" in proxy.stderr()
            assert proxy.workers() == workers
            _one(proxy, "old")
            wait_for_lines(log, 1)
            assert not missing.parent.exists()
