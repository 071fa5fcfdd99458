"""The compiled engine admitting: the global cap across workers, a dead lock holder,
the per-source limit, queue mode."""

from __future__ import annotations

import os
import select
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from forkproxy.shared.admission import REFUSED_CAP
from forkproxy.shared.per_source import source_key
from tests.support.proxy import wait_until
from tests.unit.relay import engine_harness as h
from tests.unit.relay.engine_proxy import (
    DEADLINE,
    Proxy,
    TargetServer,
    echo,
    engine_module,
    hold,
    make,
    recv_all,
    was_refused,
)

pytestmark = pytest.mark.skipif(engine_module is None, reason="the compiled engine is not built")


@pytest.fixture
def proxies() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for thing in made:
        thing.close()


def test_cap_is_exact_across_two_forked_workers(proxies: list[Any]) -> None:
    assert engine_module is not None
    target = make(proxies, TargetServer(echo))
    mapping = h.SharedMapping(capacity=7, slots=2)
    shared_listener = h.listener()
    children = []
    for slot in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover  (the child)
            try:
                engine = engine_module.Engine(
                    mapping.memory,
                    h.LAYOUT,
                    slot,
                    [(shared_listener.fileno(), 0)],
                    [[h.tcp_target(target.port)]],
                    h.Hooks(),
                )
                engine.start_accepting()
                while True:
                    select.select([engine.fileno()], [], [])
                    engine.dispatch()
            finally:
                os._exit(1)
        children.append(pid)
    try:
        port = shared_listener.getsockname()[1]
        # All in the backlog at once: both workers race to accept and admit them.
        clients = [
            socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(40)
        ]
        refused = sorted(was_refused(client) for client in clients)
        assert refused.count(False) == 7
        assert refused.count(True) == 33
        assert mapping.held_total() == 7
        assert mapping.slot_word(0, h.REFUSED) + mapping.slot_word(1, h.REFUSED) == 33
        # Capacity comes back when a relayed client leaves.
        for client in clients:
            client.close()
        wait_until(lambda: mapping.held_total() == 0, DEADLINE, "capacity to come back")
        again = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(8)]
        assert sorted(was_refused(client) for client in again) == [False] * 7 + [True]
        for client in again:
            client.close()
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        shared_listener.close()


def test_lock_holder_killed_owner_dead_is_recovered(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], per_source=3, entries=8))
    mapping = proxy.mapping
    key = bytes(10) + b"\xff\xff" + socket.inet_aton("127.0.0.9")
    assert engine_module is not None
    row = engine_module.source_row(key, 8)
    pid = os.fork()
    if pid == 0:  # pragma: no cover  (the child: dies holding the lock, mid-key)
        mapping.lock()
        mapping.set_header(h.SOURCE_DIRTY, row + 1)
        start = h.SOURCE_TABLE + row * h.SOURCE_ROW_BYTES
        mapping.memory[start : start + 8] = key[:8]
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    owner_died = 0x40000000  # FUTEX_OWNER_DIED in the lock word (futex(2), robust lists)
    assert mapping.words[h.MUTEX // 8] & 0xFFFFFFFF & owner_died
    client = proxy.connect()
    assert not was_refused(client)  # EOWNERDEAD: taken over, made consistent
    assert mapping.row_key(row) in (b"\xff" * 16, bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1]))
    assert mapping.header(h.SOURCE_DIRTY) == 0
    assert mapping.trylock() == 0  # consistent again: a plain lock from now on
    assert mapping.unlock() == 0
    second = proxy.connect()
    assert not was_refused(second)
    assert mapping.held_total() == 2


def test_per_source_limit_is_exact(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], per_source=2, entries=16))
    first = [proxy.connect("127.0.0.1") for _ in range(3)]
    assert [was_refused(client) for client in first] == [False, False, True]
    other = [proxy.connect("127.0.0.2") for _ in range(3)]
    assert [was_refused(client) for client in other] == [False, False, True]
    assert proxy.mapping.held_total() == 4
    first[0].close()
    wait_until(lambda: proxy.mapping.held_total() == 3, DEADLINE, "a unit to come back")
    again = proxy.connect("127.0.0.1")
    assert not was_refused(again)
    codes = [event[0] for event in proxy.hooks.events]
    assert engine_module is not None and engine_module.EVENT_REFUSED_SOURCE in codes


def test_per_source_table_reuses_rows_of_gone_sources(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], per_source=1, entries=4))
    for round_ in range(3):
        clients = [proxy.connect(f"127.0.{round_}.{i + 1}") for i in range(4)]
        assert [was_refused(client) for client in clients] == [False] * 4
        for client in clients:
            client.close()
        wait_until(lambda: proxy.mapping.held_total() == 0, DEADLINE, "units back")
    for row in range(4):
        assert proxy.mapping.row_counts(row, 1) == [0]


def test_global_cap_refusal_is_counted_and_reported(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(hold))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], capacity=2))
    clients = [proxy.connect() for _ in range(2)]
    wait_until(lambda: target.accepted == 2, DEADLINE, "two relayed")
    refused = proxy.connect()
    assert refused.recv(1) == b""
    assert proxy.slot(h.REFUSED) == 1
    assert engine_module is not None
    wait_until(
        lambda: [e[0] for e in proxy.hooks.events] == [engine_module.EVENT_REFUSED_CAP],
        DEADLINE,
        "the refusal event",
    )
    code, count, _, (listener, client) = proxy.hooks.events[0]
    assert (count, listener) == (1, 0)
    assert isinstance(client, str) and client.startswith("127.0.0.1:")
    for client_sock in clients:
        client_sock.close()


def test_queue_mode_holds_a_client_until_capacity_returns(proxies: list[Any]) -> None:
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], capacity=1, queue_on_limit=True))
    waits = proxy.hooks.capacity_waits
    first = proxy.connect()
    first.sendall(b"1")
    assert first.recv(1) == b"1"
    second = proxy.connect()
    second.sendall(b"2")
    wait_until(lambda: waits, DEADLINE, "on_capacity_wait")
    assert proxy.mapping.header32(h.WAITERS) == 1
    assert proxy.slot(h.WAITING) == 1  # so the master can take it back if we die
    assert proxy.runner.call(proxy.engine.retry_held) is False  # still full
    seq = proxy.mapping.header32(h.CAPACITY_SEQ)
    first.close()  # the release sees a waiter: CAPACITY_SEQ moves (and a futex wake)
    wait_until(lambda: proxy.mapping.header32(h.CAPACITY_SEQ) != seq, DEADLINE, "the wake")
    assert proxy.runner.call(proxy.engine.retry_held) is True
    assert second.recv(1) == b"2"
    assert proxy.mapping.header32(h.WAITERS) == 0
    assert proxy.slot(h.WAITING) == 0
    assert proxy.slot(h.REFUSED) == 0


def test_python_and_compiled_workers_share_one_exact_cap(proxies: list[Any]) -> None:
    """A Python worker's admitter (slot 1) and the compiled engine (slot 0) in one mapping:
    one global cap, one per-source row for a source, each listener's own limit."""
    target = make(proxies, TargetServer(echo))
    proxy = make(
        proxies,
        Proxy([[h.tcp_target(target.port)]], capacity=4, per_source=2, entries=16, slots=2),
    )
    python = proxy.mapping.admission.admitter(1)
    local = source_key(socket.AF_INET, ("127.0.0.1", 1))
    row = python.admit(local, 2)
    assert row >= 0
    assert not was_refused(proxy.connect("127.0.0.1"))  # the source's second
    assert was_refused(proxy.connect("127.0.0.1"))  # over the listener's limit of 2
    assert python.admit(local, 3) >= 0  # a listener of limit 3 still takes it
    assert not was_refused(proxy.connect("127.0.0.2"))  # the fourth: the cap
    assert python.admit(source_key(socket.AF_INET, ("127.0.0.3", 1)), 2) == REFUSED_CAP
    assert was_refused(proxy.connect("127.0.0.3"))
    admission = proxy.mapping.admission
    assert admission.table.find(local) == row  # the engine found the row Python claimed
    assert admission.source_in_use(local) == 3
    assert proxy.mapping.held_total() == 4
    python.release(row)
    wait_until(lambda: proxy.mapping.held_total() == 3, DEADLINE, "the release")
    assert not was_refused(proxy.connect("127.0.0.4"))


@pytest.mark.parametrize("queue", [False, True], ids=["refuse", "queue"])
def test_a_lock_held_too_long_delays_a_client_and_never_refuses_it(
    proxies: list[Any], queue: bool
) -> None:
    """A busy mutex (its holder preempted) is no cap: the client is held with the request
    it sent, the next one waits in the backlog, and both are admitted once it is free."""
    target = make(proxies, TargetServer(echo))
    proxy = make(proxies, Proxy([[h.tcp_target(target.port)]], queue_on_limit=queue))
    assert proxy.mapping.lock() == 0  # another process's admit, stalled
    try:
        first = proxy.connect()
        first.sendall(b"request")
        wait_until(lambda: proxy.runner.call(proxy.engine.holding), DEADLINE, "a held client")
        second = proxy.connect()  # left in the backlog meanwhile
        second.sendall(b"next")
        assert target.accepted == 0
        assert proxy.slot(h.ACCEPTED) == 0 and proxy.slot(h.REFUSED) == 0
    finally:
        assert proxy.mapping.unlock() == 0
    for client, request in ((first, b"request"), (second, b"next")):
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == request
    assert proxy.slot(h.ACCEPTED) == 2 and proxy.slot(h.REFUSED) == 0
    assert proxy.mapping.header32(h.WAITERS) == 0 and proxy.slot(h.WAITING) == 0
    assert engine_module is not None
    assert engine_module.EVENT_REFUSED_BUSY not in [event[0] for event in proxy.hooks.events]
