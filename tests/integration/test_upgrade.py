"""Upgrades: another version installed with pip over the running one, then SIGHUP. The
master re-executes into the new code with the same PID, and no request fails; a version
whose workers cannot start leaves the old workers serving."""

import signal
from pathlib import Path

import pytest

from forkproxy.relay.engine import engine_name
from tests.support.proxy import Proxy, run_backend, run_proxy, wait_until
from tests.support.reloading import reload, scrape, value
from tests.support.supervision import METRICS_LISTENERS, METRICS_NAMES, RequestLoad
from tests.support.upgrade import Venv, Version, build_wheels

BEFORE, AFTER, BROKEN = "0.1.0+before", "0.1.0+after", "0.1.0+broken"


def _break_workers(source: Path) -> None:
    """Every worker of this version fails at start, as a bad release's would."""
    worker = source / "forkproxy" / "relay" / "worker.py"
    worker.write_text(
        worker.read_text()
        + "\n\ndef run_worker(spec: WorkerSpec) -> int:  # noqa: F811\n"
        + '    raise RuntimeError("a release whose workers cannot start")\n'
    )


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    versions = [Version(BEFORE), Version(AFTER), Version(BROKEN, _break_workers)]
    return build_wheels(tmp_path_factory.mktemp("versions"), versions)


def _version(proxy: Proxy) -> str:
    samples = scrape(proxy)
    assert samples is not None
    (version,) = [
        dict(labels)["version"]
        for (name, labels), sample in samples.items()
        if name == "forkproxy_build_info" and sample == 1
    ]
    return version


def test_an_upgrade_runs_the_new_code_in_the_same_process(
    workdir: Path, wheels: dict[str, Path]
) -> None:
    venv = Venv(workdir / "venv")
    venv.install(wheels[BEFORE])
    with (
        run_backend("echo") as backend,
        run_proxy(
            ["-w", "2", backend.target],
            workdir,
            listeners=METRICS_LISTENERS,
            names=METRICS_NAMES,
            executable=venv.forkproxy,
        ) as proxy,
    ):
        master = proxy.pid
        assert _version(proxy) == BEFORE
        with RequestLoad(proxy) as load:
            venv.install(wheels[AFTER])
            reload(lambda: scrape(proxy), proxy.signal)
            load.more()
        assert load.failures == []
        assert _version(proxy) == AFTER
        assert proxy.pid == master and proxy.process.poll() is None
        log = proxy.stderr()
        assert f"re-executing as forkproxy {AFTER} (engine {engine_name()})" in log
        assert f"took over 2 workers from forkproxy {BEFORE}" in log
        assert proxy.stop() == 0


def test_an_upgrade_whose_workers_cannot_start_keeps_the_old_workers(
    workdir: Path, wheels: dict[str, Path]
) -> None:
    venv = Venv(workdir / "venv")
    venv.install(wheels[BEFORE])
    with (
        run_backend("echo") as backend,
        run_proxy(
            ["-w", "2", backend.target],
            workdir,
            listeners=METRICS_LISTENERS,
            names=METRICS_NAMES,
            executable=venv.forkproxy,
        ) as proxy,
    ):
        master, workers = proxy.pid, proxy.workers()
        with RequestLoad(proxy) as load:
            venv.install(wheels[BROKEN])
            reload(lambda: scrape(proxy), proxy.signal, expect="failed")
            load.more()
            assert proxy.workers() == workers  # the new ones are gone, the old ones serve
            samples = scrape(proxy)
            assert samples is not None
            assert value(samples, "forkproxy_workers", generation="current") == 2
            venv.install(wheels[AFTER])
            reload(lambda: scrape(proxy), proxy.signal, signum=signal.SIGUSR2)
            load.more()
        assert load.failures == []
        assert proxy.pid == master and _version(proxy) == AFTER
        wait_until(lambda: not set(proxy.workers()) & set(workers), 30, "the old workers to go")
        log = proxy.stderr()
        assert "workers keep dying" in log
        assert "the old workers go on with the previous settings" in log
        assert "READY=1" in proxy.notifications.lines()
        assert proxy.stop() == 0
