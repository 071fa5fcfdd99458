"""The respawn policy: which deaths count towards the crash loop, and the backoff."""

import signal

import pytest

from forkproxy.supervisor.respawn import (
    BACKOFF_MAX,
    CRASH_LIMIT,
    CRASH_WINDOW,
    RespawnPolicy,
    died_on_its_own,
)


def _exited(code: int) -> int:
    return code << 8  # a wait status, as waitpid(2) reports it


def _killed(signum: int) -> int:
    return int(signum)


@pytest.mark.parametrize(
    ("status", "hung", "own"),
    [
        (_exited(70), False, True),  # a bug escaped the worker
        (_exited(1), False, True),
        (_killed(signal.SIGSEGV), False, True),
        (_killed(signal.SIGABRT), False, True),
        (_killed(signal.SIGBUS), False, True),
        (_killed(signal.SIGKILL), True, True),  # our kill: its heartbeat stopped
        (_killed(signal.SIGKILL), False, False),  # the OOM killer, an admin
        (_killed(signal.SIGTERM), False, False),
        (_exited(0), False, False),  # drained after a SIGTERM sent to it alone
    ],
)
def test_only_deaths_of_a_workers_own_doing_count(status: int, hung: bool, own: bool) -> None:
    assert died_on_its_own(status, hung) is own


def test_the_crash_loop_needs_its_crashes_within_the_window() -> None:
    policy = RespawnPolicy()
    spaced = [policy.crash_loop(i * CRASH_WINDOW / (CRASH_LIMIT - 1) * 1.01) for i in range(9)]
    assert not any(spaced)
    policy = RespawnPolicy()
    assert [policy.crash_loop(100.0 + i) for i in range(CRASH_LIMIT)] == [False] * (
        CRASH_LIMIT - 1
    ) + [True]


def test_the_backoff_doubles_to_its_ceiling_and_resets_after_a_stable_spell() -> None:
    policy = RespawnPolicy()
    delays = [policy.delay(3, early=True) for _ in range(8)]
    assert delays[:3] == [0.1, 0.2, 0.4]
    assert delays[-1] == BACKOFF_MAX
    assert policy.delay(3, early=False) == 0.0
    assert policy.delay(3, early=True) == 0.1
