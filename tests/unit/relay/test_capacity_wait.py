"""--on-limit=queue's wait: capacity freed by another process, even by its death, is
handed to the waiting loop by the kernel."""

import asyncio
from collections.abc import Iterator

import pytest
import uvloop

from forkproxy.relay.capacity_wait import CapacityWaiter
from forkproxy.shared.admission import GONE, NO_TOKEN, Admission
from tests.support.forked import Child


@pytest.fixture
def admission() -> Iterator[Admission]:
    admission = Admission(1)
    yield admission
    admission.remove()


def test_wait_acquire(admission: Admission) -> None:
    token = admission.wait_acquire(1.0)
    assert token == 0
    assert admission.wait_acquire(0.01) == NO_TOKEN  # at the cap: times out
    admission.release(token)
    admission.remove()
    assert admission.wait_acquire(0.01) == GONE


@pytest.mark.parametrize("how", ["release", "sigkill"])
def test_waiter_gets_capacity_freed_elsewhere(admission: Admission, how: str) -> None:
    def take_and_release() -> int:
        return admission.try_acquire()

    holder = Child(take_and_release)
    holder.start()
    assert holder.result() == 0
    assert admission.in_use() == 1 and admission.try_acquire() == NO_TOKEN

    loop = uvloop.new_event_loop()
    try:
        got: asyncio.Future[int] = loop.create_future()
        waiter = CapacityWaiter(admission, loop, got.set_result)
        waiter.request()
        if how == "release":
            holder.finish()  # exits normally; SEM_UNDO returns its unit
        else:
            holder.kill()
        token = loop.run_until_complete(asyncio.wait_for(got, 10))
        assert token == 0
        assert admission.in_use() == 1  # ours now
        admission.release(token)
        waiter.stop()
    finally:
        loop.close()
