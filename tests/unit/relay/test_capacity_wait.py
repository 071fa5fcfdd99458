"""--on-limit=queue's wait: capacity freed by another process, by its release or by the
master's reap of it after a SIGKILL, wakes the waiting loop through the futex."""

import asyncio
from collections.abc import Iterator

import pytest
import uvloop

from forkproxy.relay.capacity_wait import CapacityWaiter
from forkproxy.shared.admission import ADMITTED, REFUSED_CAP
from tests.support.forked import Child
from tests.support.shared_memory import Shared, make_shared


@pytest.fixture
def shared() -> Iterator[Shared]:
    made = make_shared(1)
    yield made
    made.close()


@pytest.mark.parametrize("how", ["release", "sigkill"])
def test_waiter_wakes_when_capacity_is_freed_elsewhere(shared: Shared, how: str) -> None:
    admission = shared.admission
    holder_admitter = admission.admitter(1)
    holder = Child(
        lambda: holder_admitter.admit(None), then=lambda: holder_admitter.release(ADMITTED)
    )
    holder.start()
    assert holder.result() == ADMITTED
    admitter = admission.admitter(0)

    loop = uvloop.new_event_loop()
    try:
        woken: asyncio.Future[None] = loop.create_future()
        waiter = CapacityWaiter(admission.seq_address, loop, lambda: woken.set_result(None))
        admitter.wait_begin()
        seq = admitter.capacity_seq()
        assert admitter.admit(None) == REFUSED_CAP
        waiter.wait(seq)
        if how == "release":
            holder.finish()  # releases, sees a waiter: bumps the sequence and wakes it
        else:
            holder.kill()
            admission.reclaim(1)  # what the master does once it has reaped it
        loop.run_until_complete(asyncio.wait_for(woken, 10))
        assert admitter.capacity_seq() != seq
        assert admitter.admit(None) == ADMITTED
        admitter.wait_end()
        waiter.stop()
    finally:
        loop.close()


def test_a_wait_on_a_changed_sequence_returns_at_once(shared: Shared) -> None:
    admitter = shared.admission.admitter(0)
    loop = uvloop.new_event_loop()
    try:
        woken: asyncio.Future[None] = loop.create_future()
        waiter = CapacityWaiter(shared.admission.seq_address, loop, lambda: woken.set_result(None))
        waiter.wait(admitter.capacity_seq() + 1)  # a release came between read and wait
        loop.run_until_complete(asyncio.wait_for(woken, 10))
        waiter.stop()
    finally:
        loop.close()
