"""Reloads (SIGHUP, SIGUSR2) of the installed forkproxy: a new configuration file applies
to new connections only, wrong settings leave the running ones serving, --listen
addresses come and go, the cap counts old and new workers together, and signals sent
during a reload wait for the new image. (Under load: test_reload_under_load.py.)"""

import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.counting import CountingBackend, outcome
from tests.support.proxy import Proxy, children_of, free_port, run_proxy, wait_until
from tests.support.reloading import (
    NamedTarget,
    Samples,
    greeting,
    reload,
    reloads,
    scrape,
    scrape_at,
    value,
)
from tests.support.supervision import METRICS_LISTENERS, METRICS_NAMES


def _config(path: Path, text: str) -> None:
    path.write_text(text)


def _open(proxy: Proxy) -> tuple[socket.socket, str]:
    client = proxy.connect(timeout=10)
    return client, greeting(client)


def test_a_new_target_gets_new_connections_only(workdir: Path) -> None:
    """A connection opened before the reload stays with the old target, bytes flowing
    both ways, until it ends; connections after it go to the new one."""
    config = workdir / "forkproxy.toml"
    with NamedTarget("old") as old, NamedTarget("new") as new:
        _config(config, f'targets = ["{old.target}"]\nworkers = 2\n')
        with run_proxy(
            ["--config", str(config)], workdir, listeners=METRICS_LISTENERS, names=METRICS_NAMES
        ) as proxy:
            before, name = _open(proxy)
            assert name == "old"
            _config(config, f'targets = ["{new.target}"]\nworkers = 2\n')
            reload(lambda: scrape(proxy), proxy.signal)
            for _ in range(10):
                after, name = _open(proxy)
                assert name == "new"
                after.close()
            before.sendall(b"still the old target")  # its echo, through an old worker
            assert before.recv(100) == b"still the old target"
            assert old.current == 1
            before.close()
            wait_until(lambda: old.current == 0, 10, "the old connection to end")
            wait_until(
                lambda: _draining(scrape(proxy)) == 0, 30, "the old workers to finish draining"
            )
            assert old.total == 1 and new.total == 10


def _draining(samples: Samples | None) -> float:
    return -1 if samples is None else value(samples, "forkproxy_workers", generation="draining")


@pytest.mark.parametrize(
    ("broken", "logged"),
    [
        ('targets = ["127.0.0.1:1"\nworkers = 2\n', "forkproxy.toml:2:1: invalid TOML"),
        (
            'targets = ["127.0.0.1:99999"]\nworkers = 2\n',
            "forkproxy.toml:1: key 'targets': invalid target '127.0.0.1:99999'",
        ),
        (
            'targets = ["127.0.0.1:1"]\nworkers = 2\nworker = 3\n',
            "forkproxy.toml:3: key 'worker': no such option (did you mean 'workers'?)",
        ),
    ],
    ids=["syntax", "address", "unknown-key"],
)
def test_a_broken_config_keeps_the_old_settings(workdir: Path, broken: str, logged: str) -> None:
    config = workdir / "forkproxy.toml"
    with NamedTarget("old") as old, NamedTarget("new") as new:
        _config(config, f'targets = ["{old.target}"]\nworkers = 2\n')
        with run_proxy(
            ["--config", str(config)], workdir, listeners=METRICS_LISTENERS, names=METRICS_NAMES
        ) as proxy:
            workers = proxy.workers()
            _config(config, broken.replace("127.0.0.1:1", new.target))
            reload(lambda: scrape(proxy), proxy.signal, expect="failed")
            assert f"reload failed: {workdir}/{logged}" in proxy.stderr()
            assert proxy.workers() == workers  # nothing was touched
            client, name = _open(proxy)
            client.close()
            assert name == "old"
            _config(config, f'targets = ["{new.target}"]\nworkers = 2\n')
            reload(lambda: scrape(proxy), proxy.signal, signum=signal.SIGUSR2)
            client, name = _open(proxy)
            client.close()
            assert name == "new"


def test_listen_addresses_added_and_dropped(workdir: Path) -> None:
    """--listen in the file: an address added is bound; one taken by another process fails
    the reload after the exec, in the new image, which goes on with the old settings and
    workers; a dropped one is closed once its workers drain."""
    config, metrics = workdir / "forkproxy.toml", workdir / "metrics.sock"
    first, second = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"

    def connect_to(address: str) -> Callable[[], socket.socket]:
        host, _, port = address.rpartition(":")
        return lambda: socket.create_connection((host, int(port)), timeout=10)

    def scraper() -> Samples | None:
        return scrape_at(lambda: _unix(metrics))

    def settings(*listen: str) -> str:
        addresses = ", ".join(f'"{address}"' for address in listen)
        return f'targets = ["{target.target}"]\nworkers = 2\nlisten = [{addresses}]\n'

    with NamedTarget("target") as target:
        _config(config, settings(first))
        with run_proxy(
            ["--config", str(config), "--metrics", str(metrics)], workdir, listeners=()
        ) as proxy:
            with socket.create_server(("127.0.0.1", int(second.rsplit(":", 1)[1]))):
                _config(config, settings(first, second))  # --check does not bind: it passes
                workers = proxy.workers()
                reload(scraper, proxy.signal, expect="failed")
                log = proxy.stderr()
                assert f"reload failed: cannot listen on '{second}': Address already in use" in log
                assert "keeping the previous settings and workers" in log
                assert proxy.workers() == workers
            with connect_to(first)() as client:
                assert greeting(client) == "target"
            reload(scraper, proxy.signal)  # the address is free now
            for address in (first, second):
                with connect_to(address)() as client:
                    assert greeting(client) == "target"
            held = connect_to(first)()
            assert greeting(held) == "target"
            _config(config, settings(second))
            reload(scraper, proxy.signal)
            with pytest.raises(ConnectionRefusedError):
                connect_to(first)()  # closed: old workers were told to drain
            held.sendall(b"held")  # ... and finish what they have
            assert held.recv(10) == b"held"
            held.close()
            with connect_to(second)() as client:
                assert greeting(client) == "target"
            assert proxy.stop() == 0


def _unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def test_the_cap_holds_across_old_and_new_workers(workdir: Path) -> None:
    """-c 4: connections held by old workers count against the new ones, during and after
    reloads, and a lower cap applies to the old workers' connections at once."""
    config = workdir / "forkproxy.toml"
    with CountingBackend() as target:
        _config(config, f'targets = ["{target.target}"]\nworkers = 2\nconnections-max = 4\n')
        with run_proxy(
            ["--config", str(config)], workdir, listeners=METRICS_LISTENERS, names=METRICS_NAMES
        ) as proxy:
            held = [proxy.connect() for _ in range(4)]
            assert [outcome(client) for client in held] == ["admitted"] * 4
            stop = threading.Event()
            outcomes: list[str] = []

            def knock() -> None:  # clients while the reloads run
                while not stop.is_set():
                    with proxy.connect() as client:
                        outcomes.append(outcome(client))

            knocker = threading.Thread(target=knock)
            knocker.start()
            try:
                for _ in range(3):
                    reload(lambda: scrape(proxy), proxy.signal)
                wait_until(lambda: len(outcomes) > 20, 30, "clients during the reloads")
            finally:
                stop.set()
                knocker.join()
            assert set(outcomes) == {"refused"} and target.peak == 4
            held.pop().close()
            held.pop().close()
            wait_until(lambda: _active(proxy) == 2, 10, "two connections to end")
            # Connected at once, so accepted in any order by the workers: counted, not ranked.
            more = _by_outcome([proxy.connect() for _ in range(3)])
            assert sorted(more) == ["admitted", "refused"] and len(more["admitted"]) == 2
            held += more["admitted"]  # two in old workers, two in new ones
            more["refused"][0].close()
            _config(config, f'targets = ["{target.target}"]\nworkers = 2\nconnections-max = 2\n')
            reload(lambda: scrape(proxy), proxy.signal)
            held.pop().close()
            held.pop().close()
            wait_until(lambda: _active(proxy) == 2, 10, "two connections to end")
            with proxy.connect() as client:
                assert outcome(client) == "refused"  # the new cap, the old workers' count
            held.pop().close()
            wait_until(lambda: _active(proxy) == 1, 10, "one more to end")
            last = _by_outcome([proxy.connect() for _ in range(2)])
            assert {name: len(clients) for name, clients in last.items()} == {
                "admitted": 1,
                "refused": 1,
            }
            assert target.peak == 4
            for client in held + last["admitted"] + last["refused"]:
                client.close()


def _by_outcome(clients: list[socket.socket]) -> dict[str, list[socket.socket]]:
    """The clients by what became of them ("admitted", "refused")."""
    result: dict[str, list[socket.socket]] = {}
    for client in clients:
        result.setdefault(outcome(client), []).append(client)
    return result


def _active(proxy: Proxy) -> float:
    samples = scrape(proxy)
    return -1 if samples is None else value(samples, "forkproxy_connections_active")


def test_signals_sent_during_reloads_wait_for_the_new_image(workdir: Path) -> None:
    """SIGTTIN, SIGTTOU and SIGHUP every 5 ms across reloads: whatever the master
    is doing, checking or re-executing, none is lost to the exec (where most signals'
    default action ends a process) and the master lives on with its PID and serves."""
    kinds = [signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP, signal.SIGUSR2]
    with run_proxy(
        ["-w", "2", "127.0.0.1:1"], workdir, listeners=METRICS_LISTENERS, names=METRICS_NAMES
    ) as proxy:
        master = proxy.pid
        stop = threading.Event()

        def send() -> None:
            index = 0
            while not stop.wait(0.005):  # the storm's pace, not a synchronisation
                index += 1
                try:
                    proxy.signal(kinds[index % len(kinds)])
                except ProcessLookupError:
                    return

        def reloaded() -> bool:
            samples = scrape(proxy)
            return samples is not None and reloads(samples)[0] >= 2

        sender = threading.Thread(target=send)
        sender.start()
        try:
            wait_until(lambda: reloaded() or proxy.process.poll() is not None, 120, "reloads")
        finally:
            stop.set()
            sender.join()
        assert proxy.process.poll() is None, proxy.stderr()[-3000:]
        wait_until(lambda: _converged(proxy), 60, "one generation serving")
        assert proxy.pid == master and proxy.process.poll() is None


def _converged(proxy: Proxy) -> bool:
    samples = scrape(proxy)
    if samples is None:
        return False
    workers = value(samples, "forkproxy_workers", generation="current")
    return (
        value(samples, "forkproxy_workers", generation="draining") == 0
        and workers == value(samples, "forkproxy_workers_target")
        and len(children_of(proxy.pid)) == workers
    )
