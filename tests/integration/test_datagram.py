"""Datagram listeners (UDP, unix datagram) relayed by session, through the real program.

Targets are tests.support.message_backend processes; clients are the test's own sockets.
Nothing here is timed: waits are for replies, metrics or a process to exit, with
generous deadlines. Loss is never tolerated: where the kernel could drop a datagram for
want of buffer (UDP has no backpressure), the test keeps what is in flight below the
receiving socket's buffer, and says so.
"""

import contextlib
import http.client
import os
import random
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.message_backend import framed
from tests.support.proxy import (
    FORKPROXY,
    Backend,
    Proxy,
    free_port,
    run_backend,
    run_cli,
    run_proxy,
    wait_until,
)

MESSAGES = "tests.support.message_backend"
UDP_MAX = 65_507  # the largest UDP payload over IPv4

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: tuple[str, int]) -> Samples:
    connection = http.client.HTTPConnection(address[0], address[1], timeout=10)
    try:
        connection.request("GET", "/metrics")
        body = connection.getresponse().read().decode()
    finally:
        connection.close()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` with `labels` (over all listeners, say)."""
    found = [
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    ]
    assert found, f"no {name} {labels} in the scrape"
    return sum(found)


def dropped(samples: Samples) -> dict[str, float]:
    """Datagrams dropped by reason, over all listeners."""
    reasons: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if name == "forkproxy_datagrams_dropped_total":
            reason = dict(labels)["reason"]
            reasons[reason] = reasons.get(reason, 0) + value
    return reasons


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def exchange(client: socket.socket, payload: bytes) -> bytes:
    client.send(payload)
    return client.recv(1 << 17)


# -- the acceptance run under systemd-socket-activate ----------------------------------------


class InFlight:
    """Keeps the bytes in flight to one UDP socket below its receive buffer.

    UDP has no backpressure: a datagram that finds the receiver's buffer full is dropped
    by the kernel, on loopback too. systemd-socket-activate makes the listening socket
    with the default buffer (net.core.rmem_default, 208 KiB here), which 50 clients with
    a 64 KiB datagram each in flight would overflow whatever the proxy does. So a client
    takes the datagram's cost in the receiver's accounting (its skb truesize, bounded
    by the size plus DATAGRAM_OVERHEAD) before sending and gives it back on the reply.
    """

    DATAGRAM_OVERHEAD = 8192  # truesize over the payload: at most ~5.5 KiB on loopback

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.free = budget
        self.condition = threading.Condition()

    def cost(self, size: int) -> int:
        return min(self.budget, size + self.DATAGRAM_OVERHEAD)

    def take(self, size: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.free >= self.cost(size), timeout=60)
            self.free -= self.cost(size)

    def give(self, size: int) -> None:
        with self.condition:
            self.free += self.cost(size)
            self.condition.notify_all()


def _sizes(client: int, count: int) -> list[int]:
    """Payload sizes from 1 to UDP_MAX: mostly small, some large, the edges for sure."""
    rng = random.Random(client)
    sizes = [
        rng.choice(
            (
                rng.randint(1, 1472),  # fits an Ethernet MTU
                rng.randint(1, 1472),
                rng.randint(1473, 16384),
                rng.randint(16385, UDP_MAX),
            )
        )
        for _ in range(count)
    ]
    sizes[0] = (1, UDP_MAX, 1472, 1473, 2, UDP_MAX - 1)[client % 6]
    return sizes


@contextlib.contextmanager
def socket_activated(port: int, args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            ["systemd-socket-activate", "--datagram", "-l", f"127.0.0.1:{port}", FORKPROXY, *args],
            stderr=stderr,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _answered(address: tuple[str, int], delivered: list[int] | None = None) -> bool:
    """Whether a probe datagram comes back (the port may not be bound yet: then the
    probe is refused or lost, and the caller asks again). `delivered` counts the probes
    that were not refused: each of them is relayed sooner or later."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.5)
        probe.connect(address)
        try:
            if delivered is not None:
                delivered[0] += 1
            return exchange(probe, b"probe") == b"probe"
        except TimeoutError:
            return False
        except ConnectionRefusedError:
            if delivered is not None:
                delivered[0] -= 1
            return False


def test_10000_udp_exchanges_from_50_clients_under_systemd_socket_activate(
    workdir: Path,
) -> None:
    port, metrics_port = free_udp_port(), free_port()
    clients, exchanges = 50, 200
    with (
        run_backend("echo", "udp:127.0.0.1:0", MESSAGES) as backend,
        socket_activated(
            port,
            ["-w", "2", "--graceful-timeout=3s", f"--metrics=127.0.0.1:{metrics_port}"]
            + [backend.target],
            workdir / "activate.log",
        ) as process,
    ):
        proxy = ("127.0.0.1", port)
        # systemd-socket-activate binds, waits for the first datagram, then execs forkproxy.
        delivered = [0]
        wait_until(lambda: _answered(proxy, delivered), 20, "the first datagram answered")
        # A probe that timed out while forkproxy started is still relayed, perhaps after
        # the one answered: count from when every probe is.
        wait_until(
            lambda: (
                metric(
                    scrape(("127.0.0.1", metrics_port)),
                    "forkproxy_datagrams_total",
                    direction="to_client",
                )
                == delivered[0]
            ),
            20,
            "every probe relayed",
        )
        before = scrape(("127.0.0.1", metrics_port))
        in_flight = InFlight(budget=180_000)  # below the 212,992-byte default buffer
        failures: list[str] = []

        def client(index: int) -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(20)
                sock.connect(proxy)
                for sequence, size in enumerate(_sizes(index, exchanges)):
                    payload = random.Random(index * 100_000 + sequence).randbytes(size)
                    in_flight.take(size)
                    try:
                        sock.send(payload)
                        reply, sender = sock.recvfrom(1 << 17)
                    except OSError as error:
                        failures.append(f"client {index}, exchange {sequence}: {error!r}")
                        return
                    finally:
                        in_flight.give(size)
                    if reply != payload or sender != proxy:
                        failures.append(
                            f"client {index}, exchange {sequence}: sent {size} bytes, got "
                            f"{len(reply)} bytes from {sender}"
                        )
                        return

        threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures[:5]
        after = scrape(("127.0.0.1", metrics_port))
        total = clients * exchanges
        for direction in ("to_target", "to_client"):
            grew = metric(after, "forkproxy_datagrams_total", direction=direction) - metric(
                before, "forkproxy_datagrams_total", direction=direction
            )
            assert grew == total
        assert set(dropped(after).values()) == {0}
        sizes = sum(sum(_sizes(index, exchanges)) for index in range(clients))
        assert (
            metric(after, "forkproxy_datagram_bytes_total", direction="to_client")
            - metric(before, "forkproxy_datagram_bytes_total", direction="to_client")
            == sizes
        )
        # One session per client address (the probes were sessions too).
        assert (
            metric(after, "forkproxy_datagram_sessions_total")
            - metric(before, "forkproxy_datagram_sessions_total")
            == clients
        )
        # A stopping worker reads no more datagrams; its sessions end by their timeout (30s
        # by default), or by the graceful timeout.
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


# -- sessions, the cap, the timeout, --datagram-replies --------------------------------------


@contextlib.contextmanager
def udp_proxy(args: list[str], directory: Path, backend: Backend) -> Iterator[Proxy]:
    """forkproxy with a UDP listener (fd 3) and a metrics socket (fd 4)."""
    with run_proxy(
        [*args, backend.target], directory, listeners=("udp", "tcp"), names=("dns", "metrics")
    ) as proxy:
        yield proxy


def metrics_of(proxy: Proxy) -> Samples:
    host, port = proxy.address(1)[:2]  # type: ignore[index]
    return scrape((host, port))


def test_sessions_count_against_the_cap_and_expire(workdir: Path) -> None:
    with (
        run_backend("echo", "udp:127.0.0.1:0", MESSAGES) as backend,
        udp_proxy(["-w", "2", "-c", "10", "--datagram-timeout=3s"], workdir, backend) as proxy,
    ):
        clients = [proxy.connect() for _ in range(11)]
        try:
            for index, client in enumerate(clients[:10]):
                assert exchange(client, b"client %d" % index) == b"client %d" % index
            samples = metrics_of(proxy)
            assert metric(samples, "forkproxy_datagram_sessions_active", listener="dns") == 10
            assert metric(samples, "forkproxy_connections_active") == 10  # they hold units

            eleventh = clients[10]
            for attempt in (1, 2):
                eleventh.send(b"eleventh")
                wait_until(
                    lambda n=attempt: dropped(metrics_of(proxy))["cap"] == n,
                    10,
                    f"datagram {attempt} of the eleventh client dropped at the cap",
                )
            eleventh.setblocking(False)
            with pytest.raises(BlockingIOError):
                eleventh.recv(100)  # nothing came back for it
            eleventh.settimeout(10)

            # Three seconds without a datagram either way: the sessions end, units return.
            wait_until(
                lambda: metric(metrics_of(proxy), "forkproxy_datagram_sessions_active") == 0,
                15,
                "the sessions to time out",
            )
            assert metric(metrics_of(proxy), "forkproxy_connections_active") == 0
            assert exchange(eleventh, b"eleventh again") == b"eleventh again"
            assert dropped(metrics_of(proxy))["cap"] == 2
        finally:
            for client in clients:
                client.close()


def test_one_reply_per_session_as_for_dns(workdir: Path) -> None:
    with (
        run_backend("echo", "udp:127.0.0.1:0", MESSAGES) as backend,
        udp_proxy(["-w", "1", "--datagram-replies=1"], workdir, backend) as proxy,
        proxy.connect() as client,
    ):
        for query in (b"first", b"second", b"third"):
            assert exchange(client, query) == query
            wait_until(
                lambda: metric(metrics_of(proxy), "forkproxy_datagram_sessions_active") == 0,
                10,
                "the session to end after its reply",
            )
        assert metric(metrics_of(proxy), "forkproxy_datagram_sessions_total") == 3


def test_a_target_that_refuses_is_counted_and_the_worker_goes_on(workdir: Path) -> None:
    """Nothing listens on the target port: the kernel refuses (ICMP port unreachable)."""
    gone = free_udp_port()
    with run_proxy(
        ["-w", "1", f"udp:127.0.0.1:{gone}"],
        workdir,
        listeners=("udp", "tcp"),
        names=("dns", "metrics"),
    ) as proxy:
        with proxy.connect() as client:
            for _ in range(3):
                client.send(b"anyone?")
        wait_until(
            lambda: (
                dropped(metrics_of(proxy))["send_error"] >= 1
                and metric(metrics_of(proxy), "forkproxy_datagram_sessions_active") == 0
            ),
            10,
            "the refusal counted and the session ended",
        )
        assert len(proxy.workers()) == 1 and proxy.process.poll() is None
        assert "refused" in proxy.stderr().lower()


# -- unix datagram targets and listeners ------------------------------------------------------


def test_unix_datagram_target_gets_every_message_whole(workdir: Path) -> None:
    """A burst from a unix datagram client, through forkproxy, to a unix datagram target
    that checks each message: none cut, merged, reordered or lost (unix datagram sockets
    have backpressure, which forkproxy passes on)."""
    rng = random.Random(3)
    sizes = [40, 41, 1000, 65_536, 150_000, 200_000] + [rng.randint(40, 70_000) for _ in range(294)]
    with (
        run_backend("log", f"unix-dgram:{workdir}/target.sock", MESSAGES) as backend,
        run_proxy(["-w", "2", backend.target], workdir, listeners=("unix-dgram",)) as proxy,
        proxy.connect() as client,
    ):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        for sequence, size in enumerate(sizes):
            client.send(framed(sequence, size))
        assert backend.process.stdout is not None
        lines = [backend.process.stdout.readline().strip() for _ in sizes]
        assert lines == [f"ok {sequence}" for sequence in range(len(sizes))]


def test_udp_clients_to_a_unix_datagram_target_and_back(workdir: Path) -> None:
    with (
        run_backend("check", f"unix-dgram:{workdir}/target.sock", MESSAGES) as backend,
        run_proxy(["-w", "1", backend.target], workdir, listeners=("udp",)) as proxy,
        proxy.connect() as client,
    ):
        for sequence, size in enumerate((40, 1472, 9000, UDP_MAX)):
            assert exchange(client, framed(sequence, size)) == b"ok %d" % sequence


def test_replies_reach_a_unix_datagram_client(workdir: Path) -> None:
    with (
        run_backend("echo", "udp:127.0.0.1:0", MESSAGES) as backend,
        run_proxy(["-w", "1", backend.target], workdir, listeners=("unix-dgram",)) as proxy,
        proxy.connect() as client,
    ):
        for size in (0, 1, 4096, UDP_MAX):
            payload = os.urandom(size)
            assert exchange(client, payload) == payload


# -- configuration errors and --listen ---------------------------------------------------------


def test_a_datagram_listener_with_a_stream_target_is_refused(workdir: Path) -> None:
    with run_proxy(["127.0.0.1:53"], workdir, listeners=("udp",), wait_ready=False) as proxy:
        assert proxy.wait(15) == 1
        fd_label = f"fd 3 (udp:127.0.0.1:{proxy.address()[1]})"  # type: ignore[index]
        assert proxy.stderr().strip().splitlines()[-1] == (
            f"forkproxy: cannot relay listener {fd_label}: it receives datagrams but target "
            "'127.0.0.1:53' is a stream target (write udp:HOST:PORT, unix-dgram:/path or "
            "unix-dgram:@name)"
        )


def test_a_route_gives_a_datagram_listener_its_own_targets(workdir: Path) -> None:
    with (
        run_backend("echo", "udp:127.0.0.1:0", MESSAGES) as udp_backend,
        run_backend("echo") as tcp_backend,
    ):
        routed = [f"--route=dns={udp_backend.target}", tcp_backend.target]
        with run_proxy(routed, workdir, listeners=("tcp", "udp"), names=("web", "dns")) as proxy:
            with proxy.connect(1) as client:
                assert exchange(client, b"via the route") == b"via the route"
            with proxy.connect(0) as client:
                client.sendall(b"stream")
                assert client.recv(10) == b"stream"
        unrouted = [tcp_backend.target]
        with run_proxy(
            unrouted, workdir, listeners=("tcp", "udp"), names=("web", "dns"), wait_ready=False
        ) as proxy:
            assert proxy.wait(15) == 1
            assert "cannot relay listener fd 4 'dns' (udp:127.0.0.1:" in proxy.stderr()


def test_a_stream_listener_with_a_route_to_a_datagram_target_is_refused(workdir: Path) -> None:
    with run_proxy(
        ["--route=web=udp:127.0.0.1:53", "127.0.0.1:80"],
        workdir,
        listeners=("tcp",),
        names=("web",),
        wait_ready=False,
    ) as proxy:
        assert proxy.wait(15) == 1
        assert (
            "(--route=web=...): it receives stream connections but target "
            "'udp:127.0.0.1:53' is a datagram target" in proxy.stderr()
        )


@pytest.mark.parametrize("listen", ["udp:127.0.0.1:{port}", "unix-dgram:{dir}/listen.sock"])
def test_listen_binds_datagram_sockets(workdir: Path, listen: str) -> None:
    address = listen.format(port=free_udp_port(), dir=workdir)
    with (
        run_backend("echo", "udp:127.0.0.1:0", MESSAGES) as backend,
        run_proxy(["-w", "2", f"--listen={address}", backend.target], workdir, listeners=()),
    ):
        if address.startswith("udp:"):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.connect(("127.0.0.1", int(address.rsplit(":", 1)[1])))
        else:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            client.bind("")
            client.connect(address.partition(":")[2])
        with client:
            client.settimeout(10)
            assert exchange(client, b"bound by forkproxy") == b"bound by forkproxy"


def test_check_finds_a_datagram_listener_with_a_stream_target() -> None:
    result = run_cli(["--check", "--listen", "udp:127.0.0.1:5300", "127.0.0.1:53"])
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "forkproxy: cannot relay listener udp:127.0.0.1:5300: it receives datagrams but target "
        "'127.0.0.1:53' is a stream target (write udp:HOST:PORT, unix-dgram:/path or "
        "unix-dgram:@name)"
    )
    routed = ["--check", "--listen", "dns=udp:127.0.0.1:5300", "--route=dns=udp:127.0.0.1:53"]
    result = run_cli([*routed, "--datagram-replies=1", "127.0.0.1:80"])
    assert (result.returncode, result.stdout) == (
        0,
        "'dns' udp:127.0.0.1:5300 -> udp:127.0.0.1:53  (datagram-replies=1)\n",
    )


def test_a_host_name_target_is_resolved_when_a_session_opens(
    workdir: Path, relay_engine: str
) -> None:
    """The first datagrams wait (copied) while the name is resolved, then go out. The
    Python engine resolves names per session: with the compiled one, the master says the
    datagram listeners are read with Python."""
    with run_backend("echo", "udp:127.0.0.1:0", MESSAGES) as backend:
        target = backend.target.replace("127.0.0.1", "localhost")
        with (
            run_proxy(["-w", "1", target], workdir, listeners=("udp",)) as proxy,
            proxy.connect() as client,
        ):
            for number in range(3):
                client.send(b"burst %d" % number)  # before the name is resolved, likely
            assert sorted(client.recv(100) for _ in range(3)) == [
                b"burst 0",
                b"burst 1",
                b"burst 2",
            ]
            assert exchange(client, b"then") == b"then"
            line = f"datagram target '{target}' is a host name, resolved per session"
            assert (line in proxy.stderr()) == (relay_engine == "c")


def test_unbound_unix_clients_are_relayed_without_replies(workdir: Path) -> None:
    """As syslog clients do: they send from no address. Their datagrams reach the target
    (in one session for all of them); nothing can be sent back, and that is counted."""
    with (
        run_backend("log", f"unix-dgram:{workdir}/target.sock", MESSAGES) as backend,
        run_proxy(
            ["-w", "1", backend.target],
            workdir,
            listeners=("unix-dgram", "tcp"),
            names=("log", "metrics"),
        ) as proxy,
    ):
        for sequence in range(5):
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:  # never bound
                client.sendto(framed(sequence, 100 + sequence), proxy.address(0))  # type: ignore[arg-type]
        assert backend.process.stdout is not None
        assert [backend.process.stdout.readline().strip() for _ in range(5)] == [
            f"ok {sequence}" for sequence in range(5)
        ]
        assert metric(metrics_of(proxy), "forkproxy_datagram_sessions_total") == 1
