"""The soak: a minute of mixed load through forkproxy while workers are SIGKILLed,
every byte checked and the cap counted at the backend. bench.soak judges; this runs it.

It runs by default, so CI runs it; `pytest -m "not soak"` leaves it out locally."""

import subprocess
import sys

import pytest

from tests.support.proxy import REPO

SOAK_DURATION = 60


@pytest.mark.soak
@pytest.mark.timeout(SOAK_DURATION + 180)
def test_soak_for_a_minute() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--duration", str(SOAK_DURATION)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SOAK_DURATION + 150,
    )
    print(result.stdout)  # the summary, shown with -s or on failure
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
