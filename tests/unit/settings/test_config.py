"""Checks across the fields of `Config`: the worker timeout and the heartbeat it sets."""

import pytest

from forkproxy.errors import UsageError
from forkproxy.settings.arguments import parse_args


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1ms", "--worker-timeout= must be at least 1s, got 1ms"),
        ("999ms", "--worker-timeout= must be at least 1s, got 999ms"),
        ("0.5", "--worker-timeout= must be at least 1s, got 500ms"),
        ("0", "--worker-timeout= must be at least 1s, got 0"),
    ],
)
def test_a_worker_timeout_under_a_second_is_refused(value: str, message: str) -> None:
    with pytest.raises(UsageError) as error:
        parse_args([f"--worker-timeout={value}", "127.0.0.1:80"])
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("value", "timeout", "heartbeat"),
    [("1s", 1.0, 0.25), ("2s", 2.0, 0.5), ("30s", 30.0, 1.0), ("infinity", float("inf"), 1.0)],
)
def test_a_worker_beats_at_least_four_times_per_timeout(
    value: str, timeout: float, heartbeat: float
) -> None:
    config = parse_args([f"--worker-timeout={value}", "127.0.0.1:80"])
    assert (config.worker_timeout, config.heartbeat_interval) == (timeout, heartbeat)
