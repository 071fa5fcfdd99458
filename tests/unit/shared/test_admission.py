"""The SysV-semaphore cap: exact, shared across processes, reclaimed from dead ones."""

import os
import signal

import pytest

from forkproxy.shared.admission import NO_TOKEN, SEMVMX, Admission


@pytest.fixture
def admission_of():
    made: list[Admission] = []

    def make(capacity: int) -> Admission:
        made.append(Admission(capacity))
        return made[-1]

    yield make
    for admission in made:
        admission.remove()


def test_admits_exactly_capacity(admission_of) -> None:
    admission = admission_of(3)
    tokens = [admission.try_acquire() for _ in range(3)]
    assert NO_TOKEN not in tokens
    assert admission.try_acquire() == NO_TOKEN
    assert admission.in_use() == 3
    admission.release(tokens[0])
    assert admission.in_use() == 2
    assert admission.try_acquire() != NO_TOKEN


def test_capacity_beyond_one_semaphore(admission_of) -> None:
    capacity = SEMVMX + 5
    admission = admission_of(capacity)
    tokens = [admission.try_acquire() for _ in range(capacity)]
    assert NO_TOKEN not in tokens
    assert set(tokens) == {0, 1}
    assert admission.try_acquire() == NO_TOKEN
    for token in tokens:
        admission.release(token)
    assert admission.in_use() == 0


def _in_child(action) -> int:
    """Run `action` in a forked child; return its raw wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            action()
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def test_tokens_of_a_killed_process_come_back(admission_of) -> None:
    admission = admission_of(4)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for _ in range(3):
            admission.try_acquire()
        os.write(ready_w, b"!")
        signal.pause()
        os._exit(0)
    assert os.read(ready_r, 1) == b"!"
    assert admission.in_use() == 3
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert admission.in_use() == 0  # the kernel undid the dead process's adjustments
    os.close(ready_r)
    os.close(ready_w)


def test_children_share_one_cap(admission_of) -> None:
    admission = admission_of(2)
    token = admission.try_acquire()
    _in_child(lambda: os.write(1, b"") if admission.try_acquire() == NO_TOKEN else os._exit(7))
    # the child got the last unit, held it and exited: it came back on exit
    assert admission.in_use() == 1
    admission.release(token)


def test_removed_set_refuses(admission_of) -> None:
    admission = Admission(2)
    admission.remove()
    assert admission.try_acquire() == NO_TOKEN
